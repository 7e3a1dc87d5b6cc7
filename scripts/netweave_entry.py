"""WebUI entry point. A WebUI loads every file in scripts/; this one registers the
extension folder as the package `netweave`, whatever the folder is called, so no module of
ours ever goes by a bare name like `network` or `parser` (docs/design.md §1)."""
import importlib.util
import os
import sys


def _register_package():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    loaded = sys.modules.get("netweave")
    if loaded is not None and [os.path.abspath(p) for p in getattr(loaded, "__path__", [])] == [root]:
        return loaded
    for name in [n for n in sys.modules if n == "netweave" or n.startswith("netweave.")]:
        del sys.modules[name]  # another copy was loaded first: this folder is the one installed
    spec = importlib.util.spec_from_file_location(
        "netweave", os.path.join(root, "__init__.py"), submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["netweave"] = module
    spec.loader.exec_module(module)
    return module


_register_package()
import netweave.extension  # noqa: E402,F401  - host adapters hang off this package

if importlib.util.find_spec("modules") is not None and \
        importlib.util.find_spec("modules.scripts") is not None:
    # inside a WebUI, which picks up the Script subclasses this module holds
    if importlib.util.find_spec("modules.processing_diffusers") is not None:  # SD.Next
        from netweave.extension.webui.sdnext import NetWeaveScript  # noqa: E402,F401
    elif importlib.util.find_spec("backend") is not None and \
            importlib.util.find_spec("backend.quant_ops") is not None:  # Forge Neo
        from netweave.extension.webui.neo import NetWeaveScript  # noqa: E402,F401
    elif importlib.util.find_spec("backend") is not None and \
            importlib.util.find_spec("backend.memory_management") is not None:  # Forge 2
        from netweave.extension.webui.forge import NetWeaveScript  # noqa: E402,F401
    else:  # A1111
        from netweave.extension.webui.a1111 import NetWeaveScript  # noqa: E402,F401
