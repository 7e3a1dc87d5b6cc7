"""modules/scripts.py (Neo): A1111 v1.10's Script and runner, plus `before_process` (run
first, with the raw prompt) and Neo's rule that a script's exception in a processing hook is
reported (`errors.report`) and the generation goes on."""
import traceback

from . import same_as

same_as("a1111_host", "scripts", globals())

reported = []  # (hook, script title, traceback) of every exception a hook raised


class Script(Script):  # noqa: F821 (A1111's, from same_as)
    def before_process(self, p, *args):
        pass


class ScriptRunner(ScriptRunner):  # noqa: F821
    def __init__(self, scripts):
        import gradio as gr
        self.alwayson_scripts = list(scripts)
        self.inputs = []
        with gr.Blocks():
            for script in self.alwayson_scripts:
                controls = script.ui(False) or []  # a script without controls returns None
                script.args_from = len(self.inputs)
                self.inputs += list(controls)
                script.args_to = len(self.inputs)

    def _each(self, name, p, *extra, **kw):
        for s in self.alwayson_scripts:
            try:
                getattr(s, name)(p, *extra, *p.script_args[s.args_from:s.args_to], **kw)
            except Exception:
                reported.append((name, s.title(), traceback.format_exc()))

    def before_process(self, p):
        self._each("before_process", p)
