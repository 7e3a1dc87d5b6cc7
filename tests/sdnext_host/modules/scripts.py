"""modules/scripts.py → scripts_manager (SD.Next): Script, AlwaysVisible, the runner."""
AlwaysVisible = object()


class Script:
    args_from = None
    args_to = None

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass


class ScriptRunner:
    def __init__(self, scripts):
        import gradio as gr
        self.alwayson_scripts = list(scripts)
        self.inputs = [None]  # index 0: the Script dropdown
        with gr.Blocks():
            for script in self.alwayson_scripts:
                controls = script.ui(False)
                script.args_from = len(self.inputs)
                self.inputs += list(controls)
                script.args_to = len(self.inputs)

    def _args(self, p, s):
        return p.per_script_args.get(s.title(), p.script_args[s.args_from:s.args_to])

    def _each(self, name, p, *extra, **kw):
        for s in self.alwayson_scripts:
            if s.args_to > 0:
                getattr(s, name)(p, *extra, *self._args(p, s), **kw)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kw):
        self._each("before_process_batch", p, **kw)

    def process_batch(self, p, **kw):
        self._each("process_batch", p, **kw)

    def postprocess(self, p, processed):
        for s in self.alwayson_scripts:
            s.postprocess(p, processed, *self._args(p, s))
