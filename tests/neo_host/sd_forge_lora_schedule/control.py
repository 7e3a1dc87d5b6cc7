"""extensions-builtin/sd_forge_lora_schedule/scripts/control.py (Neo @ c110346d): the
built-in "LoRA Control Integrated" script. AlwaysVisible, no UI. `before_process` clears the
class-level `mapping`, finds every `<lora:NAME:[w@t,…]>` in `p.prompt` (only that exact form:
a bracketed list right before `>`), resolves NAME through the built-in Lora's
`available_network_aliases` (an unknown NAME raises KeyError out of before_process), and maps
the file to its (w, t) pairs (fewer than two: an error line, skipped); without online LoRA it
logs "requires on-the-fly Patching" and clears the mapping. Its `on_cfg_denoiser` callback
(registered at import) does nothing with an empty mapping; otherwise it asserts
`forge_objects.unet.has_online_lora()`, and at t = sampling_step / total_sampling_steps sets
each matching OnlineLoRAPatch's strength (`patch[0][0]`) and each `dynamic_loras` entry's
"strength" to the schedule's linear interpolation."""
import re

from networks import available_network_aliases

from backend.args import dynamic_args
from modules import scripts, shared
from modules.script_callbacks import on_cfg_denoiser

TAG = re.compile(r"<lora:([^\:\>]+):\[([^\]\>]+)\]>")
log = []  # the error lines it logs (tests read them)


class LoRAControl(scripts.Script):
    mapping = {}
    applied = []  # (step, file, strength) it set (tests read them)

    def title(self):
        return "LoRA Control Integrated"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return None

    def before_process(self, p, *args):
        self.mapping.clear()
        if not isinstance(p.prompt, str):
            return
        found = False
        for m in TAG.finditer(p.prompt):
            found = True
            filename = available_network_aliases[m.group(1)].filename
            try:
                pairs = [tuple(map(float, chunk.split("@"))) for chunk in m.group(2).split(",")]
                assert len(pairs) > 1
            except Exception:
                log.append(f'Invalid Syntax for "{m.group(1)}"')
                continue
            self.mapping[filename] = pairs
        if found and not dynamic_args.online_lora:
            log.append("LoRA Control requires on-the-fly Patching")
            self.mapping.clear()

    @staticmethod
    def interp(schedule, t):
        if schedule[-1][1] <= t:
            return schedule[-1][0]
        for (w1, t1), (w2, t2) in zip(schedule, schedule[1:]):
            if t1 <= t < t2:
                return w1 + (w2 - w1) * (t - t1) / (t2 - t1)
        return schedule[-1][0]

    @classmethod
    def adjust_lora(cls, params):
        if not cls.mapping:
            return
        unet = shared.sd_model.forge_objects.unet
        assert unet.has_online_lora()
        t = params.sampling_step / params.total_sampling_steps
        for wrappers in unet.weight_wrapper_patches.values():
            for lora in wrappers:
                if lora.name in cls.mapping:
                    lora.patch[0][0] = cls.interp(cls.mapping[lora.name], t)
                    cls.applied.append((params.sampling_step, lora.name, lora.patch[0][0]))
        for entries in unet.dynamic_loras.values():
            for entry in entries:
                if entry["name"] in cls.mapping:
                    entry["strength"] = cls.interp(cls.mapping[entry["name"]], t)


on_cfg_denoiser(LoRAControl.adjust_lora)
