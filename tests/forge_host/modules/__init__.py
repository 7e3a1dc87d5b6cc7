"""Stand-ins for the Forge 2 host modules no registry has, shaped after Forge HEAD dfdcbab
(2025-06-26), as docs/design.md §6 summarises it: call order, argument names, the registry a
plain dict. Modules whose Forge code is A1111 v1.10's (extra_networks, script_callbacks,
scripts, shared, paths) run the A1111 stand-ins' source."""
import os

A1111 = os.path.join(os.path.dirname(__file__), "..", "..", "a1111_host", "modules")


def same_as_a1111(name: str, namespace: dict) -> None:
    path = os.path.join(A1111, name + ".py")
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
