"""backend/state_dict.py (Neo): `load_state_dict(model, sd)` is torch's
`model.load_state_dict(sd, strict=False)`, which copies each tensor into the Parameter the
module already holds (the same objects, new values; Neo prints what was missing or
unexpected); `try_filter_state_dict(sd, prefixes)`: the keys under the first prefix the dict
has, that prefix taken off."""


def load_state_dict(model, sd, ignore_errors=(), log_name=None, ignore_start=None):
    return model.load_state_dict(sd, strict=False)


def try_filter_state_dict(sd, prefix_list, new_prefix=""):
    for prefix in prefix_list:
        if any(k.startswith(prefix) for k in sd):
            return {new_prefix + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {}
