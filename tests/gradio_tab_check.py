"""Run by tests/test_gradio_versions.py inside a venv with another Gradio: build the NetWeave
tab there and exercise its mask functions. argv: repository root, a scratch folder."""
import importlib.util
import sys

root, scratch = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("netweave", root + "/__init__.py",
                                              submodule_search_locations=[root])
module = importlib.util.module_from_spec(spec)
sys.modules["netweave"] = module
spec.loader.exec_module(module)

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from netweave.extension import mask_tools, tab  # noqa: E402
from netweave.extension.masks import MaskStore  # noqa: E402
from netweave.extension.settings import Settings  # noqa: E402
from netweave.network.plan import CompileContext  # noqa: E402

store = MaskStore(scratch)
store.put("half", mask_tools.preset("left half", 32, 32))
with gr.Blocks() as demo:
    tab.build(store, lambda n: CompileContext(steps=n), settings=Settings())
names = {getattr(fn.fn, "__name__", "") for fn in (demo.fns.values() if isinstance(demo.fns, dict)
                                                   else demo.fns)}
assert {"save_drawing", "save_preset", "rename", "delete", "explain", "set_all"} <= names, names
# the WebUI tab (no prompt box of its own) reads the host's txt2img box in the browser
with gr.Blocks() as webui_tab:
    tab.build(store, lambda n: CompileContext(steps=n))
scripts = [d.get("js") for d in webui_tab.get_config_file()["dependencies"]]
assert any(js and "#txt2img_prompt" in js for js in scripts), scripts
editor = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "netweave_mask_editor"]
assert len(editor) == 1
if hasattr(gr, "ImageEditor"):
    assert isinstance(editor[0], gr.ImageEditor)
else:  # Gradio 3: the sketch tool's value is {"image", "mask"}
    stroke = Image.new("RGB", (8, 8))
    stroke.putpixel((2, 3), (255, 255, 255))
    assert mask_tools.from_drawing({"image": stroke, "mask": stroke}).getpixel((2, 3)) == 255
print("OK", gr.__version__, len(demo.blocks))
