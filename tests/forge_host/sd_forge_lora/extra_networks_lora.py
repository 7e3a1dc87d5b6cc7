"""extensions-builtin/sd_forge_lora/extra_networks_lora.py at Forge dfdcbab: the "lora"
handler. `activate` first appends the "sd_lora" setting's tag to every prompt (when set and
not mentioned), parses te/unet/dyn with float()/int() as A1111, and calls
networks.load_networks(names, te_multipliers, unet_multipliers, dyn_dims)."""
import networks

from modules import extra_networks, shared


def strength(text):
    return float(text)  # A1111's reading of a tag's number


def load(names, te, unet):
    networks.load_networks(names, te, unet, [None] * len(names))  # no dynamic rank


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")
        self.seen = []

    def activate(self, p, params_list):
        additional = shared.opts.data.get("sd_lora", "None")
        if additional != "None" and not any(x.items[0] == additional for x in params_list):
            p.all_prompts = [x + f"<lora:{additional}:1>" for x in p.all_prompts]
            params_list.append(extra_networks.ExtraNetworkParams(items=[additional, "1"]))
        self.seen.append([params.items for params in params_list])
        names, te, unet = [], [], []
        for params in params_list:
            names.append(params.positional[0])
            t = strength(params.positional[1]) if len(params.positional) > 1 else 1.0
            t = strength(params.named.get("te", t))
            u = strength(params.positional[2]) if len(params.positional) > 2 else t
            te.append(t)
            unet.append(strength(params.named.get("unet", u)))
        load(names, te, unet)

    def deactivate(self, p):
        pass
