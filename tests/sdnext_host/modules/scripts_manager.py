"""modules/scripts_manager.py (SD.Next): Script, the loaded script classes, and the txt2img,
img2img and control runners. For the control runner, add_script drops an external extension's
script whose title is not in installer.control_extensions (at initialize_scripts, which the
Control UI calls after every script module was imported); setup_ui numbers each script's
arguments (args_from/args_to); each hook reads its script's slice of p.script_args, or
p.per_script_args by title (the API's alwayson_scripts)."""
from typing import NamedTuple

from installer import control_extensions

from . import paths

AlwaysVisible = object()


class Script:
    args_from = None
    args_to = None
    alwayson = False
    external = False
    filename = None

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


class ScriptClassData(NamedTuple):
    script_class: type
    path: str
    basedir: str
    module: object


scripts_data = []  # filled as load_scripts imports each scripts/*.py
scripts_txt2img = scripts_img2img = scripts_control = scripts_current = None


def create_runners():
    """The end of load_scripts: one runner per tab, after every script module was imported."""
    global scripts_txt2img, scripts_img2img, scripts_control  # noqa: PLW0603
    scripts_txt2img = ScriptRunner('txt2img')
    scripts_img2img = ScriptRunner('img2img')
    scripts_control = ScriptRunner('control')


class ScriptRunner:
    def __init__(self, name=''):
        self.name = name
        self.scripts, self.alwayson_scripts, self.selectable_scripts = [], [], []
        self.inputs = [None]

    def add_script(self, script_class, path, is_img2img, is_control):
        script = script_class()
        script.filename = path
        script.is_txt2img, script.is_img2img = not is_img2img, is_img2img
        script.external = path.startswith(paths.extensions_dir) and \
            not path.startswith(paths.extensions_builtin_dir)
        if is_control and script.external and script.title() not in control_extensions:
            return  # logged upstream as: Script: fn=... type=control title=... skip
        if is_control:  # visible if it shows in either of the other tabs
            v1, v2 = script.show(script.is_txt2img), script.show(script.is_img2img)
            visibility = AlwaysVisible if AlwaysVisible in (v1, v2) else (v1 or v2)
        else:
            visibility = script.show(script.is_img2img)
        if visibility is AlwaysVisible:
            self.scripts.append(script)
            self.alwayson_scripts.append(script)
            script.alwayson = True
        elif visibility:
            self.scripts.append(script)
            self.selectable_scripts.append(script)

    def initialize_scripts(self, is_img2img=False, is_control=False):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for script_class, path, _basedir, _module in sorted(
                scripts_data, key=lambda x: x.script_class().title().lower()):
            self.add_script(script_class, path, is_img2img, is_control)

    def setup_ui(self, parent='unknown'):
        import gradio as gr
        inputs = [None]  # index 0: the Script dropdown
        with gr.Blocks():
            for script in self.alwayson_scripts:
                if self.name == 'control' and paths.extensions_dir in script.filename and \
                        script.title() not in control_extensions:
                    continue  # the UI filters again
                script.args_from = len(inputs)
                inputs += list(script.ui(script.is_img2img) or [])
                script.args_to = len(inputs)
        self.inputs = inputs
        return inputs[1:]

    def _args(self, p, s):
        return p.per_script_args.get(s.title(), p.script_args[s.args_from:s.args_to])

    def _each(self, name, p, *extra, **kw):
        for s in self.alwayson_scripts:
            if s.args_to is not None:
                getattr(s, name)(p, *extra, *self._args(p, s), **kw)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kw):
        self._each("before_process_batch", p, **kw)

    def process_batch(self, p, **kw):
        self._each("process_batch", p, **kw)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
