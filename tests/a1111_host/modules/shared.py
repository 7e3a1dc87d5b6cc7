"""modules/shared.py: opts, cmd_opts, state and the loaded model."""
from types import SimpleNamespace


class Options:
    def __init__(self):
        self.data = {}

    def __getattr__(self, item):
        data = self.__dict__["data"]
        if item in data:
            return data[item]
        raise AttributeError(item)


opts = Options()
cmd_opts = SimpleNamespace(lora_dir=None, ckpt_dir=None, data_dir=None)
state = SimpleNamespace(sampling_step=0, sampling_steps=0, interrupted=False)
sd_model = None
