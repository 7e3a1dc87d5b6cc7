"""Run by tests/test_gradio_versions.py inside a venv with another Gradio: serve a WebUI-like
page — a txt2img prompt box with the WebUIs' element id, and the NetWeave tab as a WebUI mounts
it (no prompt box of its own, no Settings) — on 127.0.0.1 until stdin closes.
argv: repository root, mask folder, port."""
import importlib.util
import os
import sys

root, masks, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("netweave", root + "/__init__.py",
                                              submodule_search_locations=[root])
module = importlib.util.module_from_spec(spec)
sys.modules["netweave"] = module
spec.loader.exec_module(module)
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402

from netweave.extension import tab  # noqa: E402
from netweave.extension.masks import MaskStore  # noqa: E402
from netweave.network.plan import CompileContext  # noqa: E402

with gr.Blocks(analytics_enabled=False) as page:
    with gr.Tab("txt2img"):
        gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=2)
    with gr.Tab("NetWeave"):
        tab.build(MaskStore(masks), lambda n: CompileContext(steps=n))
page.queue()
page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
print("serving", gr.__version__, flush=True)
sys.stdin.read()  # the test closes stdin to stop the server
page.close()
