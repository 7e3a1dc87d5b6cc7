"""`python -m netweave inspect FILE [--json]` on files of the real SD1, SD2 and SDXL shapes
(written by the fixture writer from the reference trees on the meta device)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from netweave.devtools.synthetic import write_network
from netweave.network.inspect import inspect
from netweave.network.reference import reference_trees

KOHYA_META = {"ss_tag_frequency": json.dumps({"10_pixel": {"pixel art": 40, "sprite": 12, "1girl": 3}}),
              "ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "1"}


def run(*args):
    return subprocess.run([sys.executable, "-m", "netweave", "inspect", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("arch,fmt,style", [("sd1", "lora", "kohya"), ("sd2", "loha", "kohya"),
                                            ("sdxl", "lokr", "kohya_ldm"), ("sd1", "peft", "peft")])
def test_real_shapes_are_recognised(arch, fmt, style, tmp_path):
    path = tmp_path / f"{arch}.safetensors"
    written = write_network(path, reference_trees(arch), fmt, style, arch, rank=2,
                            metadata=KOHYA_META)
    report = inspect(str(path))
    assert report["error"] is None
    assert report["architecture"] == arch and report["kind"] == "lora"
    assert report["layers"] == len(written) and report["unmatched_keys"] == []
    assert sum(report["algorithms"].values()) == len(written)
    assert report["metadata"]["trigger_words"][:2] == ["pixel art", "sprite"]


@pytest.mark.slow
def test_cli_json_contract(tmp_path):
    path = tmp_path / "sd1.safetensors"
    write_network(path, reference_trees("sd1"), "lora", "kohya", "sd1", rank=1, metadata=KOHYA_META)
    result = run(str(path), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"file", "architecture", "kind", "algorithms", "layers", "unmatched_keys",
                        "metadata", "error"}
    assert out["architecture"] == "sd1" and out["algorithms"] == {"lora": out["layers"]}
    text = run(str(path))
    assert text.returncode == 0 and "lora for sd1" in text.stdout and "pixel art" in text.stdout


def test_cli_refuses_a_pickle(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(path))
    result = run(str(path), "--json")
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert "pickled" in out["error"] and out["architecture"] is None


def test_cli_missing_file(tmp_path):
    result = run(str(tmp_path / "nope.safetensors"))
    assert result.returncode == 1 and "does not exist" in result.stdout


def test_shapes_that_fit_no_architecture(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 100),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(100, 2)},
              str(path))
    report = inspect(str(path))
    assert report["error"] and "does not fit" in report["error"]


def test_pruned_checkpoint(tmp_path):
    """A checkpoint holding a few real-size layers (a full one is gigabytes)."""
    te = reference_trees("sd1")["te1"]
    q = te.get_submodule("encoder.layers.0.self_attn.q_proj")  # transformers 5: no text_model
    path = tmp_path / "ckpt.safetensors"
    save_file({"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight":
               torch.zeros(q.weight.shape),
               "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(320, 320, 1, 1),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4)}, str(path))
    report = inspect(str(path))
    assert report["error"] is None, report["error"]
    assert (report["kind"], report["architecture"], report["layers"]) == ("checkpoint", "sd1", 2)
    assert report["algorithms"] == {"model": 2} and report["unmatched_keys"] == []


@pytest.mark.parametrize("fmt", ["dora_out", "dora_in"])
def test_a_lora_with_dora_scale_is_reported_as_dora(fmt, tmp_path):
    path = tmp_path / "dora.safetensors"
    written = write_network(path, reference_trees("sd1"), fmt, "kohya", "sd1", rank=2)
    report = inspect(str(path))
    assert report["error"] is None and report["algorithms"] == {"dora": len(written)}
