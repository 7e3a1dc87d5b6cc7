"""modules/extra_networks.py (SD.Next)."""
import inspect
import re

extra_network_registry = {}


def initialize():
    extra_network_registry.clear()


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def register_default_extra_networks():
    """After scripts load: the built-in Lora (and, upstream, styles) under their names."""
    from .lora import extra_networks_lora
    register_extra_network(extra_networks_lora.ExtraNetworkLora())


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional, self.named = [], {}
        for item in self.items:
            parts = item.split('=', 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.positional == other.positional and self.named == other.named


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list, step=0, include=None, exclude=None):
        raise NotImplementedError

    def deactivate(self, p, force=False):
        raise NotImplementedError


def _call(extra_network, p, args, step, include, exclude, with_step):
    signature = list(inspect.signature(extra_network.activate).parameters)
    kw = {"step": step} if with_step else {}
    if "include" in signature and "exclude" in signature:
        kw.update(include=include, exclude=exclude)
    extra_network.activate(p, args, **kw)


def activate(p, extra_network_data=None, step=0, include=None, exclude=None):
    include, exclude = include or [], exclude or []
    if getattr(p, "disable_extra_networks", False):
        return
    extra_network_data = extra_network_data or p.network_data
    for name, args in extra_network_data.items():
        extra_network = extra_network_registry.get(name)
        if extra_network is None:
            continue  # "Skipping unknown extra network"
        _call(extra_network, p, args, step, include, exclude, with_step=True)
    for name, extra_network in extra_network_registry.items():
        if name not in extra_network_data:
            _call(extra_network, p, [], step, include, exclude, with_step=False)
    p.network_data = extra_network_data


def activate_filtered(p, data=None, step=0):
    from . import shared
    apply_te = getattr(p, "lora_apply_te", None)
    if apply_te is None:
        apply_te = shared.opts.lora_apply_te
    exclude = [] if apply_te else ["text_encoder", "text_encoder_2", "text_encoder_3"]
    activate(p, data, step=step, exclude=exclude)


def deactivate(p, extra_network_data=None, force=None):
    """At the end of a generation; force defaults to opts.lora_force_reload (False)."""
    from . import shared
    if force is None:
        force = shared.opts.lora_force_reload
    extra_network_data = extra_network_data or p.network_data
    for name in extra_network_data:
        if name in extra_network_registry:
            extra_network_registry[name].deactivate(p, force=force)
    for name, extra_network in extra_network_registry.items():
        if name not in extra_network_data:
            extra_network.deactivate(p, force=force)


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    res = {}

    def found(m):
        res.setdefault(m.group(1), []).append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""
    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts, extra_data=None):
    """One dict for the whole batch: a prompt's tags replace it; prompts without tags (as when
    process_base parses the stripped prompts again) keep the one given."""
    res = []
    extra_data = extra_data or {}
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if not extra_data or parsed:
            extra_data = parsed
        res.append(updated)
    return res, extra_data
