"""The engine benchmark on a Flux-architecture transformer (devtools/bench.py, `bench --arch
flux`): its quick size runs every row, at CI size. `check_every_row` is what any family's
quick bench must show (tests/test_bench_zimage.py uses it too)."""
import math

import pytest
import torch

from netweave.devtools.bench import ROWS, FLUX, Family, run, table

# every row but the quantized ones (`--quantize` adds those)
EXPECTED_ROWS = {k for k in ROWS if not k.startswith("quantized")}


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core box a second one mostly waits for the other
    processes' cores (the tiny model's forward took 0.5 s with two, 45 ms with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def check_every_row(result):
    """Every row finite and positive with its median inside its spread; the floors' own
    arithmetic; every layer the engine touched accounted for in its choices."""
    ratios, floors = result["ratios"], result["floor"]
    assert set(ratios) == EXPECTED_ROWS
    for key, value in ratios.items():
        lo, hi = result["spread"][key]
        assert math.isfinite(value) and value > 0 and lo <= value <= hi, key
        assert math.isfinite(floors[key]) and floors[key] > 0, key
    assert floors["static_vs_base"] == 1.0  # merged weights: the bare transformer's arithmetic
    assert floors["per_region_passes_vs_base"] == 2.0
    choices, layers = result["choices"], result["touched_layers"]
    assert sum(choices["static"].values()) == layers
    assert choices["bypass_all"]["merged"] == 0 and choices["scheduled_merge_only"]["bypassed"] == 0
    # the regional networks run beside the layers with image tokens; the text stream and the
    # per-image vectors take none of them (network/tokens.py)
    assert 0 < choices["regional"]["bypassed"] < layers


def test_the_flux_quick_bench_reports_every_row_and_the_engines_choices(one_thread):
    result = run("quick", arch=Family.FLUX.value, repeats=1)
    check_every_row(result)
    assert result["config"]["arch"] == "flux" and result["config"]["batch"] == FLUX.batch
    assert result["lora_key"].startswith("transformer.")  # diffusers' names, as ai-toolkit's
    text = table(result)
    assert "transformer" in text and "64 image + 16 text tokens" in text
    assert "layers (merged / bypassed / both)" in text
