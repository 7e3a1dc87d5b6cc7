"""format_tag gives canonical text that parses back to the same AST, over generated ASTs."""
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from netweave.network.blocks import SD1_BLOCKS
from netweave.parser import (BUILTIN_REGIONS, INTERPOLATIONS, KINDS, TEXT_ENCODER_BLOCKS,
                             BlockWeights, Intersect, Keyframe, Mask, Not, Position, Scaled,
                             Schedule, Tag, Union_, VectorEntry, Window, format, format_region,
                             parse, parse_region)
from netweave.parser.transform import EXPERTS, phase_schedule

numbers = st.floats(-10, 10, allow_nan=False, allow_subnormal=False)
nonneg = st.floats(0, 100, allow_nan=False, allow_subnormal=False).map(abs)
unit = st.floats(0, 1, allow_nan=False, allow_subnormal=False).map(abs)

word = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_ ().\-]{0,8}[A-Za-z0-9_])?", fullmatch=True)
names = st.lists(word.filter(lambda w: w not in (".", "..")), min_size=1, max_size=3).map("/".join)

sigmas = nonneg.map(lambda v: Position(v, "sigma"))  # s0.5: where the noise level reaches 0.5
positions = st.one_of(nonneg.map(lambda v: Position(v)), nonneg.map(lambda v: Position(v, "percent")),
                      sigmas)
# Forge Neo's [v@t]: a plain t is progress k/N; percent and sigma keep their own unit
progress = st.lists(st.builds(Keyframe, numbers, st.one_of(
    nonneg.map(lambda v: Position(v, "progress")), positions.filter(lambda p: p.unit != "auto"))),
    min_size=1, max_size=4).filter(lambda ks: any(k.at.unit == "progress" for k in ks))
schedules = st.one_of(
    numbers.map(Schedule.const),
    st.lists(st.builds(Keyframe, numbers, positions), min_size=1, max_size=4).map(
        lambda ks: Schedule(keys=tuple(ks))),
    progress.map(lambda ks: Schedule(keys=tuple(ks))))
# an expert's multiplier may also be Wan2GP's values stepping through its steps
expert_schedules = st.one_of(schedules, st.lists(numbers, min_size=2, max_size=5).map(phase_schedule))

entries = st.one_of(numbers.map(lambda v: VectorEntry("num", v)),
                    st.sampled_from([VectorEntry("R"), VectorEntry("U")]),
                    st.floats(-5, 5, allow_nan=False, allow_subnormal=False).map(
                        lambda v: VectorEntry("X", v)))
presets = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,6}", fullmatch=True).filter(
    lambda p: p not in ("R", "U", "X"))
weights = st.one_of(presets.map(lambda p: BlockWeights(preset=p)),
                    st.lists(entries, min_size=1, max_size=26).map(
                        lambda es: BlockWeights(entries=tuple(es))))

window_positions = st.one_of(st.integers(0, 60).map(lambda s: Position(float(s), "step")),
                             unit.map(lambda v: Position(v, "fraction")),
                             nonneg.map(lambda v: Position(v, "percent")), sigmas)
windows = st.one_of(
    st.builds(Window, start=st.none() | window_positions, stop=st.none() | window_positions),
    st.builds(Window, start=window_positions, stop=st.none() | window_positions,
              last=window_positions))

# blend= reads a bare 0 or 1 as a fraction (none / every step), so its step numbers start at 2
blend_positions = st.one_of(st.integers(2, 60).map(lambda s: Position(float(s), "step")),
                            unit.map(lambda v: Position(v, "fraction")),
                            nonneg.map(lambda v: Position(v, "percent")), sigmas)

mask_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,6}", fullmatch=True).filter(
    lambda n: n.lower() not in BUILTIN_REGIONS)
masks = st.one_of(st.sampled_from(BUILTIN_REGIONS).map(Mask), mask_names.map(Mask))
regions = st.recursive(masks, lambda inner: st.one_of(
    inner.map(Not),
    st.builds(Scaled, inner, st.floats(0, 10, allow_nan=False, allow_subnormal=False).map(abs)),
    st.lists(inner, min_size=2, max_size=3).map(lambda os: Union_(tuple(os))),
    st.lists(inner, min_size=2, max_size=3).map(lambda os: Intersect(tuple(os)))), max_leaves=8)


# a tag's blocks in their canonical order: the text encoders' (CLIP, T5, QWEN3, ...), then SD's
BLOCK_NAMES = TEXT_ENCODER_BLOCKS + tuple(b for b in SD1_BLOCKS if b not in TEXT_ENCODER_BLOCKS)


def _block_key(name):
    return BLOCK_NAMES.index(name)


@st.composite
def tags(draw):
    opt = lambda s: draw(st.none() | s)  # noqa: E731
    groups = draw(st.dictionaries(st.sampled_from(["in", "mid", "out"]), schedules, max_size=3))
    blocks = draw(st.dictionaries(st.sampled_from(BLOCK_NAMES), schedules, max_size=4))
    experts = draw(st.dictionaries(st.sampled_from(EXPERTS), expert_schedules, max_size=2))
    tag = Tag(kind=draw(st.sampled_from(KINDS)), name=draw(names),
              te=opt(schedules), te1=opt(schedules), te2=opt(schedules), te3=opt(schedules),
              unet=opt(schedules),
              hr=opt(schedules), hrte=opt(schedules), hrunet=opt(schedules),
              groups=tuple(sorted(groups.items())),
              blocks=tuple(sorted(blocks.items(), key=lambda kv: _block_key(kv[0]))),
              experts=tuple((k, experts[k]) for k in EXPERTS if k in experts),
              lbw=opt(weights), x=opt(numbers), dyn=opt(st.integers(1, 512)),
              window=draw(windows), region=opt(regions), interp=opt(st.sampled_from(INTERPOLATIONS)),
              neg=opt(numbers), blend=opt(blend_positions))
    neo = any(k.at.unit == "progress" for v in vars(tag).values() if isinstance(v, Schedule)
              for k in v.keys) or any(k.at.unit == "progress" for _, v in
                                       tag.groups + tag.blocks + tag.experts for k in v.keys)
    return replace(tag, interp="linear") if neo and tag.interp is None else tag  # Neo ramps


@settings(max_examples=600, deadline=None)
@given(tags())
def test_parse_format_roundtrip(tag):
    text = format(tag)
    parsed = parse(text)
    assert parsed.errors == (), (text, parsed.errors)
    assert parsed.tags == (tag,), text
    assert format(parsed.tags[0]) == text  # canonical: formatting is a fixed point


@settings(max_examples=300, deadline=None)
@given(regions)
def test_region_roundtrip(region):
    parsed, err = parse_region(format_region(region))
    assert err is None and parsed == region
