"""modules/prompt_parser.py (v1.10.1), reduced to what the conditioning path and NetWeave use:
SdConditioning (a list of prompts with the picture's size and whether it is the negative),
prompt editing `[to:when]` / `[from:to:when]` (not nested; no `[a|b]` alternation), AND
sub-prompts with weights, the learned-conditioning schedules and their reconstruction at a
denoiser step.

Behaviour kept exactly: `when` with a "." is a fraction of the steps, otherwise a step; in a
hires pass (hires_steps given) fractions count from 1.0 and steps from the base pass's count;
a schedule entry serves every step up to and including its `end_at_step`; dict conds (SDXL)
are rebuilt key by key into a DictWithShape whose shape is its crossattn's."""
import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
AND = re.compile(r"\bAND\b")
EDIT = re.compile(r"\[([^\[\]:]*?)(?::([^\[\]:]*?))?:\s*([0-9]*\.?[0-9]+)\s*\]")
WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None,
                 copy_from=None):
        super().__init__(prompts)
        source = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(source, "is_negative_prompt", False)
        self.width = width or getattr(source, "width", None)
        self.height = height or getattr(source, "height", None)


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None):
    if hires_steps is None:
        int_offset, flt_offset, steps = 0, 0.0, base_steps
    else:
        int_offset, flt_offset, steps = base_steps, 1.0, hires_steps

    def when(text):
        v = (float(text) - flt_offset) * steps if "." in text else float(text) - int_offset
        return min(steps, int(v))

    def schedule(prompt):
        edits = [(m, when(m.group(3))) for m in EDIT.finditer(prompt)]
        ends = sorted({steps} | {w for _, w in edits if w >= 1})

        def at(step):
            out, last = [], 0
            for m, w in edits:
                before, after = (m.group(1), m.group(2)) if m.group(2) is not None \
                    else ("", m.group(1))
                out += [prompt[last:m.start()], before if step <= w else after]
                last = m.end()
            return "".join(out) + prompt[last:]
        return [[end, at(end)] for end in ends]

    return [schedule(p) for p in prompts]


def get_learned_conditioning(model, prompts, steps, hires_steps=None):
    res = []
    for prompt_schedule in get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps):
        texts = SdConditioning([text for _, text in prompt_schedule], copy_from=prompts)
        conds = model.get_learned_conditioning(texts)
        res.append([ScheduledPromptConditioning(end, {k: v[i] for k, v in conds.items()}
                                                if isinstance(conds, dict) else conds[i])
                    for i, (end, _) in enumerate(prompt_schedule)])
    return res


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules, self.weight = schedules, weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape, self.batch = shape, batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None):
    """Each prompt split at AND; a sub-prompt's trailing ':weight' is read off."""
    parts = []
    for prompt in prompts:
        parts.append([])
        for sub in AND.split(prompt):
            text, weight = WEIGHT.search(sub).groups()
            parts[-1].append((text, float(weight) if weight is not None else 1.0))
    texts = SdConditioning([t for p in parts for t, _ in p], copy_from=prompts)
    learned = iter(get_learned_conditioning(model, texts, steps, hires_steps))
    return MulticondLearnedConditioning(
        (len(prompts),), [[ComposableScheduledPromptConditioning(next(learned), w)
                           for _, w in p] for p in parts])


class DictWithShape(dict):
    @property
    def shape(self):
        return self["crossattn"].shape


def _at(schedules, step):
    return next((e.cond for e in schedules if step <= e.end_at_step), schedules[0].cond)


def _stack(conds):
    if isinstance(conds[0], dict):
        return DictWithShape({k: torch.stack([c[k] for c in conds]) for k in conds[0]})
    return torch.stack(conds)


def reconstruct_cond_batch(c, current_step):
    return _stack([_at(schedules, current_step) for schedules in c])


def reconstruct_multicond_batch(c, current_step):
    conds, conds_list = [], []
    for composable in c.batch:
        conds_list.append([(len(conds) + i, p.weight) for i, p in enumerate(composable)])
        conds += [_at(p.schedules, current_step) for p in composable]
    return conds_list, _stack(conds)
