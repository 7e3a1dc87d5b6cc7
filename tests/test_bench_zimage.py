"""The engine benchmark on diffusers' Z-Image transformer (devtools/bench.py, `bench --arch
zimage`): its quick size runs every row end to end, on the model's lists of one latent and
one caption per image, with LoRAs in ai-toolkit's published Z-Image names."""
import torch
from torch import nn

from test_bench_flux import check_every_row, one_thread  # noqa: F401 (a fixture)

from netweave.devtools.bench import ZIMAGE, ZIMAGE_NARROW, Family, run, table


def test_the_zimage_quick_bench_runs_every_row_on_its_token_layout(one_thread):  # noqa: F811
    result = run("quick", arch=Family.ZIMAGE.value, repeats=1)
    check_every_row(result)
    ratios, floors, choices = result["ratios"], result["floor"], result["choices"]
    assert result["config"]["arch"] == "zimage" and result["config"]["batch"] == ZIMAGE.batch == 1

    # the three files cover every linear layer of the model once, in the names ai-toolkit
    # writes (diffusion_model.layers.0.attention.to_q.lora_A.weight), every key landing
    from diffusers import ZImageTransformer2DModel
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**ZIMAGE_NARROW)
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert sum(result["lora_layers"]) == result["touched_layers"] == len(linear)
    assert result["lora_key"].startswith("diffusion_model.")
    assert all(not result["problems"][k] for k in ("static", "scheduled", "bypass_all"))

    # regions: the attention and feed-forward networks run beside every layer that sees image
    # tokens (the main layers' joint sequence, image first; the noise refiner's), never on the
    # context refiner's caption tokens (4 attention + 3 feed-forward layers each); the global
    # one, on the rest, merges
    refiner = len([n for n in linear if n.startswith("context_refiner.")])
    assert refiner == 2 * 7
    attention_ff = result["lora_layers"][0] + result["lora_layers"][1]
    assert choices["regional"] == {"merged": result["lora_layers"][2],
                                   "bypassed": attention_ff - refiner, "both": 0}
    # one pass with the regions costs less arithmetic than a pass per region; a blended start
    # adds doubled steps (the hook found the batch in the lists' call), every step blended more
    assert 1 < floors["regional_vs_base"] < floors["regional_blend15_vs_base"] \
        < floors["regional_full_blend_vs_base"]
    assert floors["regional_vs_base"] < floors["per_region_passes_vs_base"]
    assert floors["regional_vs_per_region_passes"] < 1
    assert ratios["regional_vs_per_region_passes"] < 1  # measured: about 0.35 on 2 cores

    text = table(result)
    assert "64 image + 20 caption tokens (padded to 32)" in text
    assert "keys as diffusion_model." in text
