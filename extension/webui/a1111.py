"""AUTOMATIC1111 (v1.8–1.10) host adapter: the always-on script "NetWeave", the handler that
takes the `lora`, `lyco`, `loractl` and `model` tag names, per-step control from
`on_cfg_denoiser`, and NetWeave's HTTP routes (docs/design.md §6).

Shared with Forge in ldm.py; here: A1111's module trees, its built-in Lora's
backups put back in `process`, and its CFGDenoiser row layout (conds, then unconds).
"""
from __future__ import annotations

import sys

import torch

from modules import scripts, shared  # the host's own

from .ldm import Adapter, LdmScript, register


class A1111Adapter(Adapter):
    @staticmethod
    def trees(sd_model) -> dict:
        trees = {"unet": sd_model.model.diffusion_model}
        if getattr(sd_model, "is_sdxl", False):
            embedders = sd_model.conditioner.embedders
            trees.update(te1=embedders[0], te2=embedders[1])
        else:
            trees["te1"] = sd_model.cond_stage_model
        return trees

    def take_names(self, p) -> None:
        self.names.take(p)  # the built-in is told to load nothing
        release_builtin_weights(self.trees(shared.sd_model))

    def describe_rows(self, n: int, per: int) -> None:
        """A1111's CFGDenoiser batch: every prompt's cond rows, then one uncond row each."""
        self.engine.set_rows([i for i in range(n) for _ in range(per)] + list(range(n)),
                             [False] * (per * n) + [True] * n)


def release_builtin_weights(trees: dict) -> None:
    """Layers the built-in Lora merged are put back from its own backups now (it would do so
    lazily at their next forward, after NetWeave took its pristine copies)."""
    builtin = sys.modules.get("networks")
    restore = getattr(builtin, "network_restore_weights_from_backup", None)
    if restore is None:
        return
    with torch.no_grad():
        for tree in trees.values():
            for module in tree.modules():
                if getattr(module, "network_current_names", ()):
                    restore(module)
                    module.network_current_names = ()


ADAPTER = A1111Adapter()


class NetWeaveScript(LdmScript, scripts.Script):
    adapter = ADAPTER


register(ADAPTER)
