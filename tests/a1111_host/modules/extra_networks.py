"""modules/extra_networks.py (v1.10.1): registry, params, parse_prompt(s), activate/deactivate."""
import re
from collections import defaultdict

extra_network_registry = {}
extra_network_aliases = {}


def initialize():
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network, alias):
    extra_network_aliases[alias] = extra_network


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split('=', 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def activate(p, extra_network_data):
    activated = []
    for extra_network_name, extra_network_args in extra_network_data.items():
        extra_network = extra_network_registry.get(extra_network_name) or \
            extra_network_aliases.get(extra_network_name)
        if extra_network is None:
            continue
        extra_network.activate(p, extra_network_args)
        activated.append(extra_network)
    for extra_network_name, extra_network in extra_network_registry.items():
        if extra_network in activated:
            continue
        extra_network.activate(p, [])
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(p, batch_number=p.iteration, prompts=p.prompts,
                                                seeds=p.seeds, subseeds=p.subseeds,
                                                extra_network_data=extra_network_data)


def deactivate(p, extra_network_data):
    for extra_network_name in extra_network_data:
        extra_network = extra_network_registry.get(extra_network_name) or \
            extra_network_aliases.get(extra_network_name)
        if extra_network is not None:
            extra_network.deactivate(p)
    for extra_network_name, extra_network in extra_network_registry.items():
        if extra_network_name not in extra_network_data:
            extra_network.deactivate(p)


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""
    prompt = re.sub(re_extra_net, found, prompt)
    return prompt, res


def parse_prompts(prompts):
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed
        res.append(updated)
    return res, extra_data
