"""modules/shared.py (SD.Next): the loaded pipeline, its type, opts, state."""
from types import SimpleNamespace


class State:
    def __init__(self):
        self.sampling_step, self.interrupted = 0, False

    def step(self):
        self.sampling_step += 1


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None,
                 onchange=None, section=None, **kwargs):
        self.default, self.label, self.component = default, label, component
        self.component_args, self.section = component_args, section


class Options(SimpleNamespace):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.data, self.data_labels = dict(kw), {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)


opts = Options(lora_apply_te=False, lora_force_reload=False, sd_textencoder_cache_size=4)
cmd_opts = SimpleNamespace(lora_dir=None, ckpt_dir=None, data_dir=None)
state = State()
sd_model = None  # the diffusers pipeline
sd_model_type = "sd"  # 'sd', 'sdxl', 'f1' (Flux.1), 'chroma', … from the pipeline's class name
