"""modules/lora/extra_networks_lora.py + networks.py (SD.Next), native fused loading only.

`changed(requested, include, exclude)` keeps what was loaded in a dict on the pipeline,
`loaded_loras`, keyed by the text `include=<csv or all>:exclude=<csv or none>`, and compares
the request with the list under that same key only; on a change it clears the dict and keeps
the request under this key. `activate` unfuses the previously loaded networks (restricted to
include/exclude) and fuses the requested ones only when changed() says so, and records them as
previously loaded only when `include` is empty. `deactivate` unfuses only with force: fused
weights stay between generations until an activation sees a change.

A stand-in "network" moves one parameter of each component the pipeline has (text_encoder,
and unet or, for the Flux family, transformer: networks.py's default components) by a fixed
random amount drawn from its name (the real one reads the file); unfusing restores the saved
bits. `fused` says which networks are in each component's weights now."""
import zlib

import torch

from .. import extra_networks, shared

# the parameter moved: the first whose name ends so (the transformers of Flux/Chroma, Z-Image,
# SD3, Wan, Qwen-Image; CLIP/T5/umT5, Qwen3/Qwen2.5-VL)
COMPONENTS = {'text_encoder': ('.final_layer_norm.weight', 'model.norm.weight', '.norm.weight'),
              'unet': ('.conv_in.bias',),
              'transformer': ('.x_embedder.bias', 'x_embedder.2-1.bias', 'pos_embed.proj.bias',
                              'patch_embedding.bias', 'img_in.bias')}
previously_loaded_networks = []


def pipeline():
    return getattr(shared.sd_model, 'pipe', shared.sd_model)


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__('lora')
        self.seen = []  # the params of every call, for tests
        self.fused = {c: [] for c in self.components()}
        self._backup = {}

    def changed(self, requested, include=None, exclude=None):
        if shared.opts.lora_force_reload:
            return True, 'forced'
        sd_model = pipeline()
        if not hasattr(sd_model, 'loaded_loras'):
            sd_model.loaded_loras = {}
        key = f"include={','.join(include or ['all'])}:exclude={','.join(exclude or ['none'])}"
        loaded = sd_model.loaded_loras.get(key, [])
        if requested != loaded:
            sd_model.loaded_loras.clear()
            sd_model.loaded_loras[key] = requested
            return True, 'changed'
        return False, 'none'

    def activate(self, p, params_list, step=0, include=None, exclude=None):
        global previously_loaded_networks  # noqa: PLW0603
        include, exclude = include or [], exclude or []
        self.seen.append([x.items for x in params_list])
        loaded = []
        for params in params_list:
            te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            unet = float(params.named.get('unet', te))
            loaded.append((params.positional[0], te, unet))
        requested = [f'{name}:{te}:{unet}' for name, te, unet in loaded]
        has_changed, _ = self.changed(requested, include, exclude)
        if has_changed:
            if previously_loaded_networks:
                self.unfuse(include, exclude)
            self.fuse(loaded, include, exclude)
            if not include:
                previously_loaded_networks = loaded

    def deactivate(self, p, force=False):
        if force:
            self.unfuse()

    @staticmethod
    def components(include=(), exclude=()):
        held = [c for c in COMPONENTS if getattr(pipeline(), c, None) is not None]
        return [c for c in (include or held) if c in held and c not in exclude]

    def _param(self, component):
        module = getattr(pipeline(), component)
        params = dict(module.named_parameters())
        return next(params[n] for end in COMPONENTS[component] for n in params
                    if ('.' + n).endswith(end))

    def unfuse(self, include=(), exclude=()):
        with torch.no_grad():
            for c in self.components(include, exclude):
                if c in self._backup:
                    self._param(c).copy_(self._backup.pop(c))
                self.fused[c] = []

    def fuse(self, loaded, include=(), exclude=()):
        with torch.no_grad():
            for c in self.components(include, exclude):
                for name, te, unet in loaded:
                    param = self._param(c)
                    self._backup.setdefault(c, param.detach().clone())
                    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    delta = torch.randn(param.shape, generator=g).to(param.dtype)
                    param.add_(delta * (te if c.startswith('text_encoder') else unet))
                    self.fused[c].append(name)
