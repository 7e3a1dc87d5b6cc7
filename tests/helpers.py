from netweave.network.plan import CompileContext, compile_prompt
from netweave.parser import parse


def one_tag(text):
    parsed = parse(text)
    assert [e for e in parsed.errors if e.severity == "error"] == [], parsed.errors
    assert len(parsed.tags) == 1, parsed
    return parsed.tags[0]


def one_network(text, steps=30, arch="sd1", **kw):
    plan = compile_prompt(text, CompileContext(arch=arch, steps=steps, **kw))
    assert [e for e in plan.errors if e.severity == "error"] == [], plan.errors
    assert len(plan.networks) == 1, plan
    return plan.networks[0]


def series(values):
    return [round(float(v), 6) for v in values]


def standalone_host(root):
    """The standalone host on the tiny default model with its demo networks under `root`:
    (host, library, masks)."""
    from netweave.extension.standalone.host import DiffusersHost
    from netweave.extension.library import Library
    from netweave.extension.masks import MaskStore
    from netweave.extension.standalone.models import tiny_library, tiny_model

    model = tiny_model()
    loras, models = tiny_library(model, str(root / "demo"))
    library = Library([loras], [models], base=str(root))  # messages name folders from root
    masks = MaskStore(str(root / "masks"))
    return DiffusersHost(model, library, masks), library, masks
