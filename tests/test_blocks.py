"""lora-block-weight vectors and presets resolved per architecture (SD1, SDXL)."""
import pytest

from helpers import one_network, series
from netweave.network.blocks import LBW_LAYOUTS, PRESETS, SD1_BLOCKS, SDXL_BLOCKS, parse_preset_file
from netweave.network.plan import CompileContext, compile_prompt


def vec(values):
    return ",".join(str(v) for v in values)


def test_block_lists():
    assert len(SD1_BLOCKS) == 26 and len(SDXL_BLOCKS) == 20
    assert LBW_LAYOUTS["sd1"][17] == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
                                      "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09",
                                      "OUT10", "OUT11")
    assert LBW_LAYOUTS["sdxl"][12] == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01",
                                       "OUT02", "OUT03", "OUT04", "OUT05")


@pytest.mark.parametrize("arch,length", [("sd1", 17), ("sd1", 26), ("sdxl", 12), ("sdxl", 20)])
def test_vector_maps_onto_its_blocks_and_zeroes_the_rest(arch, length):
    values = [round(0.01 * (i + 1), 2) for i in range(length)]
    n = one_network(f"<lora:n:lbw={vec(values)}>", steps=1, arch=arch)
    layout = LBW_LAYOUTS[arch][length]
    for block, v in zip(layout, values):
        assert series(n.base.blocks[block]) == [v]
    for block in set(n.base.blocks) - set(layout):
        assert series(n.base.blocks[block]) == [0.0]  # LBW's to26: missing blocks are 0


@pytest.mark.parametrize("arch,length", [("sd1", 12), ("sd1", 20), ("sdxl", 17), ("sdxl", 26),
                                         ("sd1", 5)])
def test_wrong_length_is_a_clear_error(arch, length):
    plan = compile_prompt(f"a <lora:n:lbw={vec([1] * length)}> b", CompileContext(arch=arch, steps=2))
    assert plan.networks == ()
    (err,) = plan.errors
    assert err.severity == "error" and f"{length} values" in err.message
    assert ("SD1" if arch == "sd1" else "SDXL") in err.message
    assert err.column == 11  # points at lbw=


def test_sd1_presets_are_lbw_defaults():
    n = one_network("<lora:n:lbw=MIDD>", steps=1)
    on = {b for b, v in n.base.blocks.items() if v[0] == 1}
    assert on == {"BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"}


@pytest.mark.parametrize("name", sorted(PRESETS["sdxl"]))
def test_every_preset_resolves_on_both_architectures(name):
    for arch in ("sd1", "sdxl"):
        n = one_network(f"<lora:n:lbw={name}>", steps=1, arch=arch)
        assert len(n.lbw) == (17 if arch == "sd1" else 12)


def test_sdxl_presets_keep_their_meaning():
    n = one_network("<lora:n:lbw=OUTD>", steps=1, arch="sdxl")
    on = {b for b, v in n.base.blocks.items() if v[0] == 1}
    assert on == {"BASE", "OUT00", "OUT01", "OUT02"}


def test_unknown_preset_lists_the_known_ones():
    plan = compile_prompt("<lora:n:lbw=NOPE>", CompileContext(steps=2))
    assert plan.networks == () and "unknown lbw preset 'NOPE'" in plan.errors[0].message
    assert "OUTALL" in plan.errors[0].message


def test_user_presets_from_an_lbw_presets_file():
    presets = parse_preset_file("# mine\nMYONE:" + vec([0.5] * 17) + "\nBAD:1,foo\n")
    n = one_network("<lora:n:lbw=MYONE>", steps=1, presets=presets)
    assert series(n.base.blocks["OUT11"]) == [0.5]
    plan = compile_prompt("<lora:n:lbw=BAD>", CompileContext(steps=1, presets=presets))
    assert plan.networks == () and "not a vector" in plan.errors[0].message


def test_random_values_are_lbw_ranges_and_seeded():
    text = "<lora:n:lbw=" + vec(["R"] * 8 + ["U"] * 9) + ">"
    a = one_network(text, steps=1, seed=7).lbw
    b = one_network(text, steps=1, seed=7).lbw
    c = one_network(text, steps=1, seed=8).lbw
    assert a == b and a != c
    assert all(0 <= v <= 1 and round(v, 3) == v for v in a[:8])
    assert all(-0.5 <= v <= 1.5 for v in a[8:])


def test_block_key_overrides_vector_and_groups_multiply():
    n = one_network("<lora:n:lbw=ALL:IN01=0.5:in=0.5:OUT03=0@0,1@1>", steps=2)
    assert series(n.base.blocks["IN01"]) == [0.25, 0.25]  # own value 0.5 × in 0.5
    assert series(n.base.blocks["IN02"]) == [0.5, 0.5]  # vector 1 × in 0.5
    assert series(n.base.blocks["OUT03"]) == [0, 1]


def test_block_key_missing_from_architecture_warns():
    plan = compile_prompt("<lora:n:IN10=0>", CompileContext(arch="sdxl", steps=2))
    assert len(plan.networks) == 1
    assert plan.errors[0].severity == "warning" and "IN10" in plan.errors[0].message
    assert "IN10" not in plan.networks[0].base.blocks


def test_te2_on_sd1_warns_and_strict_mode_skips():
    plan = compile_prompt("<lora:n:te2=0.5>", CompileContext(arch="sd1", steps=2))
    assert len(plan.networks) == 1 and plan.errors[0].severity == "warning"
    plan = compile_prompt("<lora:n:te2=0.5>", CompileContext(arch="sd1", steps=2, strict=True))
    assert plan.networks == () and plan.errors[0].severity == "error"


def test_every_block_of_every_architecture_has_a_key_but_in_and_out_which_are_groups():
    from netweave.network.blocks import BLOCKS, TEXT_BLOCKS
    from netweave.parser import TEXT_ENCODER_BLOCKS, Schedule, parse
    assert {b for arch in TEXT_BLOCKS.values() for b in arch.values()} <= set(TEXT_ENCODER_BLOCKS)
    for name in sorted({b for names in BLOCKS.values() for b in names} - {"IN", "OUT"}):
        for written in (name, name.lower()):
            parsed = parse(f"<lora:n:{written}=0.5>")
            assert parsed.errors == (), written
            assert parsed.tags[0].blocks == ((name, Schedule.const(0.5)),), written
    assert parse("<lora:n:in=0.5:out=0>").tags[0].groups == (("in", Schedule.const(0.5)),
                                                             ("out", Schedule.const(0)))


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "flux", "chroma", "sd3", "zimage", "qwenimage",
                                  "wan22"])
def test_a_text_encoder_block_key_acts_where_the_model_has_that_encoder_else_warns(arch):
    from netweave.network.blocks import ARCH_TITLES, BLOCKS, TEXT_BLOCKS
    from netweave.parser import TEXT_ENCODER_BLOCKS
    own = TEXT_BLOCKS[arch]
    for name in TEXT_ENCODER_BLOCKS:
        plan = compile_prompt(f"<lora:n:1:{name.lower()}=0.5>", CompileContext(arch=arch, steps=2))
        assert len(plan.networks) == 1, (arch, name)  # never an error that drops the tag
        n = plan.networks[0]
        if name in own.values():
            assert plan.errors == ()
            assert all(series(n.base.effective(te, name)) == [0.5, 0.5]
                       for te, block in own.items() if block == name)
        else:
            (warning,) = plan.errors
            assert warning.severity == "warning" and warning.column == 11, warning
            assert f"{ARCH_TITLES[arch]} has no text-encoder block {name} " in warning.message
            assert all(b in warning.message for b in own.values())  # what it has instead
            assert all(series(v) == [1, 1] for v in n.base.blocks.values())  # nothing scaled
        assert set(n.base.blocks) == set(BLOCKS[arch])


def test_te3_off_sd35_warns_naming_the_encoders_there_and_strict_mode_skips():
    plan = compile_prompt("<lora:n:0.5:te3=0>", CompileContext(arch="flux", steps=2))
    (warning,) = plan.errors
    assert warning.severity == "warning" and warning.column == 13
    assert warning.message == ("Flux has no te3 (its text encoder is te1 (CLIP-L) and te2 "
                               "(T5-XXL)); te3 is ignored")
    assert series(plan.networks[0].base.strength["te2"]) == [0.5, 0.5]  # te= still counts
    plan = compile_prompt("<lora:n:te3=0>", CompileContext(arch="sdxl", steps=2, strict=True))
    assert plan.networks == () and plan.errors[0].severity == "error"
    assert compile_prompt("<lora:n:te3=0>", CompileContext(arch="sd3", steps=2)).errors == ()


def test_a_missing_denoiser_block_names_the_blocks_the_model_has():
    plan = compile_prompt("<lora:n:D40=0:IN12=0>", CompileContext(arch="sd3", steps=2))
    assert sorted(e.message for e in plan.errors) == [
        "block D40 does not exist in SD3 (IN, D00–D37, OUT); it is ignored",
        "block IN12 does not exist in SD3 (IN, D00–D37, OUT); it is ignored"]
    plan = compile_prompt("<lora:n:B00=0>", CompileContext(arch="sd1", steps=2))
    assert plan.errors[0].message == ("block B00 does not exist in SD1 (IN00–IN11, M00, "
                                      "OUT00–OUT11); it is ignored")
