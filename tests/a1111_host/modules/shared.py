"""modules/shared.py: opts, cmd_opts, state and the loaded model."""
from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None,
                 onchange=None, section=None, **kwargs):
        self.default, self.label, self.component = default, label, component
        self.component_args, self.section = component_args, section


class Options:
    def __init__(self):
        self.data = {}
        self.data_labels = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        data = self.__dict__["data"]
        if item in data:
            return data[item]
        raise AttributeError(item)


opts = Options()
cmd_opts = SimpleNamespace(lora_dir=None, ckpt_dir=None, data_dir=None)
state = SimpleNamespace(sampling_step=0, sampling_steps=0, interrupted=False)
sd_model = None
