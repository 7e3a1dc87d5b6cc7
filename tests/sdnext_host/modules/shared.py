"""modules/shared.py (SD.Next): the loaded pipeline, its type, opts, state."""
from types import SimpleNamespace


class State:
    def __init__(self):
        self.sampling_step, self.interrupted = 0, False

    def step(self):
        self.sampling_step += 1


opts = SimpleNamespace(lora_apply_te=False, sd_textencoder_cache_size=4)
cmd_opts = SimpleNamespace(lora_dir=None, ckpt_dir=None, data_dir=None)
state = State()
sd_model = None  # the diffusers pipeline
sd_model_type = "sd"  # 'sd', 'sdxl', … from the pipeline's class name
