"""Stand-ins for Forge Neo's host modules (Haoming02/sd-webui-forge-classic, branch `neo`:
modules/processing.py @ 2bec129a, sd_samplers_cfg_denoiser.py @ 0ac3dba6, scripts.py and
script_callbacks.py as Neo keeps A1111 v1.10's), reduced to what NetWeave meets. Modules whose
Neo code is Forge 2's or A1111's run those stand-ins' source (`same_as`)."""
import os

TESTS = os.path.join(os.path.dirname(__file__), "..", "..")


def same_as(host: str, name: str, namespace: dict) -> None:
    """Run tests/<host>/modules/<name>.py in `namespace` (host: "a1111_host", "forge_host")."""
    path = os.path.join(TESTS, host, "modules", name + ".py")
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)


def same_as_a1111(name: str, namespace: dict) -> None:
    """What Forge 2's stand-ins call for A1111's source (they run here through same_as)."""
    same_as("a1111_host", name, namespace)
