"""Shared by the engine tests: tiny trees' snapshots, network files for SD1 and SDXL, plans."""
import torch

from netweave.network.calibrate import Calibration
from netweave.network.engine import Engine
from netweave.network.plan import CompileContext, compile_prompt

LBW17 = "1,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.1,1.2,1.3,1.4,1.5,1.6,1.7"


def snapshot(trees):
    return {(c, k): v.detach().clone() for c, t in trees.items()
            for k, v in list(t.state_dict(keep_vars=True).items())}


def assert_pristine(trees, before):
    for c, t in trees.items():
        for k, v in t.state_dict(keep_vars=True).items():
            assert torch.equal(v.detach(), before[c, k]), (c, k)


# Prices as a 2-core CPU measures them (calibrate.py), fixed so that which layers merge and
# which run beside does not depend on the machine a test runs on or what else it is doing.
TEST_COSTS = Calibration(merge_ns_per_mac=0.03, merge_us_per_layer=10.0, bypass_ns_per_mac=0.03,
                         bypass_us_per_call=20.0, batch_ns_per_mac=0.045, batch_us_per_layer=15.0,
                         delta_ns_per_value=0.4, delta_us_per_layer=3.0)


def make_engine(trees, arch, netdir, **kw):
    def find(kind, name):
        path = netdir / f"{name}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"no {kind} named '{name}'")
        return str(path)
    return Engine(trees, arch, find, **{"costs": TEST_COSTS, **kw})


def plan(prompt, arch="sd1", steps=6, hires=None):
    p = compile_prompt(prompt, CompileContext(arch=arch, steps=steps, hires_steps=hires))
    assert not [e for e in p.errors if e.severity == "error"], p.errors
    return p


def unet_out(trees, arch):
    unet = trees["unet"]
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 5, {"sd1": 32, "sdxl": 80}[arch])
    t = torch.tensor([10, 10])
    with torch.no_grad():
        if hasattr(unet, "input_blocks"):
            return unet(x, t, context=ctx)
        extra = {}
        if arch == "sdxl":
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 48), "time_ids": torch.randn(2, 6)}}
        return unet(x, t, encoder_hidden_states=ctx, **extra).sample
