"""modules/api/script.py (SD.Next): init_default_script_args, the arguments a run gets when it
is given none: 0 for the script dropdown, then each script's UI values, from calling its ui()
again inside a throwaway Blocks."""


def init_default_script_args(script_runner):
    import gradio as gr
    last = max([1] + [s.args_to or 0 for s in script_runner.scripts])
    script_args = [None] * last
    script_args[0] = 0
    with gr.Blocks():
        for script in script_runner.scripts:
            controls = script.ui(script.is_img2img)
            if controls:
                script_args[script.args_from:script.args_to] = [c.value for c in controls]
    return script_args
