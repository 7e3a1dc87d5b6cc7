"""extensions-builtin/sd_forge_lora/extra_networks_lora.py (Neo): Forge 2's "lora" handler
(tests/forge_host/sd_forge_lora/extra_networks_lora.py: the "sd_lora" setting's tag appended,
te and unet read as A1111 reads them), calling Neo's networks.load_networks(names, te, unet).
A strength written as the built-in schedule's `[w@t,…]` counts as 1 here (no stored copy of
Neo's current file says how it reads one; the schedule sets the online patch's strength at
every step)."""
import os

_FORGE = os.path.join(os.path.dirname(__file__), "..", "..", "forge_host", "sd_forge_lora",
                      "extra_networks_lora.py")
with open(_FORGE) as _f:
    exec(compile(_f.read(), _FORGE, "exec"), globals())


def strength(text):
    return 1.0 if str(text).startswith("[") else float(text)


def load(names, te, unet):
    networks.load_networks(names, te, unet)  # noqa: F821 (imported by Forge's source)
