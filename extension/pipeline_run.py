"""The engine through one diffusers pipeline call, for every host that runs diffusers (the
standalone host, SD.Next): the text encoded once per text-encoder segment (the negative prompt
with each network's `neg`, one more encoding per regional text-encoder network), the batch
rows, and the step-end callback that moves the engine and swaps the embeddings where a segment
ends. Step 0's weights are in place before the pipeline starts. With a hires pass, the last
base step's callback puts the weights (text encoders included) at hires step 0, since the
host's next UNet call, after it encodes the prompt again, is that step."""
from __future__ import annotations

from typing import Dict, Optional

import torch


class PipelineRun:
    def __init__(self, engine, pipe, arch: str, device, prompt: str, negative: str,
                 batch: int, cfg: bool, steps: int, hires_steps: Optional[int] = None):
        self.engine, self.pipe, self.arch, self.device = engine, pipe, arch, device
        self.batch, self.cfg = batch, cfg
        self.prompt, self.negative = prompt, negative
        self.phase, self.steps, self.hires_steps = "base", steps, hires_steps
        self.embeds = self._encodings("base")
        engine.set_rows([0] * (2 * batch if cfg else batch), [True] * batch * cfg + [False] * batch)
        engine.set_step(0)
        self.segment = engine.segment_at(0)
        self._use(self.segment)

    def first_args(self) -> dict:
        """The pipeline's embedding arguments for step 0."""
        e = self.embeds[self.segment]
        args = {"prompt_embeds": e["pos"], "negative_prompt_embeds": e["neg"] if self.cfg else None}
        if self.arch == "sdxl":
            args.update(pooled_prompt_embeds=e["pooled"],
                        negative_pooled_prompt_embeds=e["neg_pooled"] if self.cfg else None)
        return args

    def step_end(self, i: int) -> Dict[str, torch.Tensor]:
        """After step i: weights for step i+1; new embeddings (as the pipeline holds them, with
        [negative; prompt] rows) when i+1 starts another text-encoder segment."""
        k = i + 1
        if k >= self.steps:
            if self.phase == "base" and self.hires_steps:
                self.phase, self.steps = "hires", self.hires_steps
                self.embeds.update(self._encodings("hires"))  # leaves the TEs at hires step 0
                self.engine.set_step(0, "hires")
                self.segment = self.engine.segment_at(0, "hires")
                self._use(self.segment)
            return {}
        self.engine.set_step(k, self.phase)
        seg = self.engine.segment_at(k, self.phase)
        if seg == self.segment:
            return {}
        self.segment = seg
        out = {"prompt_embeds": self._use(seg)}
        if self.arch == "sdxl":
            e = self.embeds[seg]
            out["add_text_embeds"] = torch.cat([e["neg_pooled"], e["pooled"]]) if self.cfg \
                else e["pooled"]
        return out

    # ---- text ----------------------------------------------------------------------------
    def _encode(self, text: str) -> dict:
        with torch.no_grad():
            out = self.pipe.encode_prompt(prompt=text, device=self.device,
                                          num_images_per_prompt=self.batch,
                                          do_classifier_free_guidance=False)
        if self.arch == "sdxl":  # (embeds, neg, pooled, neg_pooled)
            return {"embeds": out[0], "pooled": out[2]}
        return {"embeds": out[0], "pooled": None}

    def _encodings(self, phase: str) -> dict:
        found = {}
        for seg, (pos, neg, variants) in segment_encodings(
                self.engine, phase, self._encode, self.prompt, self.negative, self.cfg).items():
            found[seg] = {"pos": pos["embeds"], "neg": neg and neg["embeds"],
                          "pooled": pos["pooled"], "neg_pooled": neg and neg["pooled"],
                          "variants": {j: v["embeds"] for j, v in variants.items()}}
        return found

    def _use(self, seg) -> torch.Tensor:
        """The UNet's conditioning rows for a segment, and its regional variants given to the
        engine (rows are matched by value, so the pipeline's batching does not matter)."""
        e = self.embeds[seg]
        rows = torch.cat([e["neg"], e["pos"]]) if self.cfg else e["pos"]
        self.engine.set_text_variants(rows, {
            j: torch.cat([e["neg"], v]) if self.cfg else v for j, v in e["variants"].items()})
        return rows


def segment_encodings(engine, phase: str, encode, prompt: str, negative: str, cfg: bool) -> dict:
    """Per text-encoder segment of a pass: (the prompt's encoding, the negative prompt's with
    each network's `neg` when `cfg`, else None, {regional network: the prompt's encoding with
    it}); the text encoders are left as step 0 has them, since a host may encode again."""
    found = {}
    for seg in engine.te_segments(phase):
        engine.apply_te(seg)
        pos = encode(prompt)
        neg = None
        if cfg:
            engine.apply_te(seg, uncond=True)
            neg = encode(negative)
        variants = {}
        for j in seg.variants:
            engine.apply_te(seg, variant=j)
            variants[j] = encode(prompt)
        found[seg] = (pos, neg, variants)
    if found:
        engine.apply_te(next(iter(found)))
    return found
