"""The built-in Lora extension as far as NetWeave meets it: its "lora" handler (parses the
items with float(), as A1111's does, and records what it sees) and its `networks` module state
(loaded_networks; per-layer network_current_names and backups, restored lazily)."""
import types

from modules import extra_networks

networks = types.ModuleType("networks")
networks.loaded_networks = []


def network_restore_weights_from_backup(module):
    backup = getattr(module, "network_weights_backup", None)
    if backup is not None:
        module.weight.data.copy_(backup)


networks.network_restore_weights_from_backup = network_restore_weights_from_backup


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")
        self.seen = []

    def activate(self, p, params_list):
        self.seen.append([params.items for params in params_list])
        names, multipliers = [], []
        for params in params_list:
            names.append(params.positional[0])
            te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            multipliers.append(float(params.named.get("te", te)))
        networks.loaded_networks = list(zip(names, multipliers))

    def deactivate(self, p):
        pass
