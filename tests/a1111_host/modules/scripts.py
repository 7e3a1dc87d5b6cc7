"""modules/scripts.py (v1.10.1): Script, AlwaysVisible and a runner that slices script_args."""


class AlwaysVisibleType:
    pass


AlwaysVisible = AlwaysVisibleType()


class Script:
    args_from = None
    args_to = None
    infotext_fields = None

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

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass


class ScriptRunner:
    """The always-on scripts of one tab; defaults from each script's ui() (called inside the
    API's gr.Blocks a second time, as A1111's init_default_script_args does)."""

    def __init__(self, scripts):
        import gradio as gr
        self.alwayson_scripts = list(scripts)
        self.inputs = []
        with gr.Blocks():  # A1111 builds every script's ui() inside its Blocks
            for script in self.alwayson_scripts:
                controls = script.ui(False)
                script.args_from = len(self.inputs)
                self.inputs += list(controls)
                script.args_to = len(self.inputs)

    def default_args(self):
        return [getattr(c, "value", c) for c in self.inputs]

    def _each(self, name, p, *extra, **kw):
        for s in self.alwayson_scripts:
            getattr(s, name)(p, *extra, *p.script_args[s.args_from:s.args_to], **kw)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kw):
        self._each("before_process_batch", p, **kw)

    def after_extra_networks_activate(self, p, **kw):
        self._each("after_extra_networks_activate", p, **kw)

    def process_batch(self, p, **kw):
        self._each("process_batch", p, **kw)

    def process_before_every_sampling(self, p, **kw):
        self._each("process_before_every_sampling", p, **kw)

    def postprocess(self, p, processed):
        for s in self.alwayson_scripts:
            s.postprocess(p, processed, *p.script_args[s.args_from:s.args_to])
