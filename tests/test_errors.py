"""parse() never raises on user text: errors carry a message, a column and a caret snippet;
a bad tag is skipped, the rest goes on; text outside tags is untouched."""
import pytest

from netweave.network.plan import CompileContext, compile_prompt
from netweave.parser import parse, parse_region


def only_error(prompt):
    parsed = parse(prompt)
    assert len(parsed.errors) == 1, parsed.errors
    return parsed, parsed.errors[0]


@pytest.mark.parametrize("prompt,column,words", [
    ("<lora:x:te=abc>", 12, ["te=abc", "a number"]),
    ("cat <lora:x:0@0,1@>", 19, ["a number"]),
    ("<lora:x:lbw=>", 13, []),
    ("<lora:x:region=a+>", 18, ["mask name"]),
    ("<lora:x:interp=wobbly>", 16, ["unknown interp", "linear"]),
    ("<lora:x:dyn=2.5>", 13, ["dyn"]),
    ("<lora:x:stop=1.5>", 14, ["fraction"]),
    ("<lora:>", 7, ["network name"]),
    ("<lora:x:1@s>", 11, ["a sigma like s0.5"]),  # a sigma needs its number
    ("<lora:x:1@s-0.5>", 11, ["a sigma like s0.5"]),  # and it is ≥ 0
    ("<lora:x:1@s0.5%>", 15, ["found '%'"]),  # a sigma is no percentage
    ("<lora:x:start=s1e4>", 15, ["out of range"]),
    ("<lora:x:1:step=s0.9-s>", 21, ["a sigma like s0.5"]),
])
def test_error_message_column_snippet(prompt, column, words):
    parsed, err = only_error(prompt)
    assert err.severity == "error"
    assert err.column == column, (err.column, err.message)
    for w in words:
        assert w in err.message, err.message
    tag_line, caret_line = err.snippet.split("\n")
    tag_start = prompt.index("<")
    assert tag_line == prompt[tag_start:]
    assert caret_line == " " * (column - 1 - tag_start) + "^"
    assert parsed.tags == ()  # the bad tag is skipped


def test_bad_tag_is_skipped_and_the_rest_goes_on():
    parsed = parse("a <lora:good:0.5> b <lora:bad:te=?> c <lyco:other>")
    assert [t.name for t in parsed.tags] == ["good", "other"]
    assert parsed.text == "a b c"
    assert len(parsed.errors) == 1 and parsed.errors[0].column == 34


@pytest.mark.parametrize("name,words", [
    ("../secret", ".."), ("a/../../b", ".."), ("/etc/passwd", "absolute"), ("\\\\server\\x", "absolute"),
    ("~/x", "absolute"), ("a\x00b", "control"), ("a\x07b", "control"), ("a//b", "empty"), ("  ", "empty"),
])
def test_bad_names(name, words):
    parsed = parse(f"<lora:{name}:1>")
    assert parsed.tags == ()
    assert words in parsed.errors[0].message


def test_subfolders_and_spaces_are_fine():
    assert parse("<lora:style/my lora (v2):1>").tags[0].name == "style/my lora (v2)"
    assert parse("<lora:style\\anime:1>").tags[0].name == "style/anime"


def test_unclosed_tag_is_reported_and_left_in_the_text():
    parsed = parse("cat <lora:x:0.5 dog")
    assert parsed.tags == () and parsed.text == "cat <lora:x:0.5 dog"
    assert "not closed" in parsed.errors[0].message and parsed.errors[0].column == 5


def test_extra_positional_and_duplicates_warn():
    parsed = parse("<lora:x:1:1:8:0.5:te=0.2:te=0.3>")
    assert len(parsed.tags) == 1 and parsed.tags[0].te.constant == 0.3
    # positional #4 has no meaning; te is given three times (positional, te=0.2, te=0.3)
    assert [e.severity for e in parsed.errors] == ["warning", "warning", "warning"]
    assert parse("<lora:x:1:1:8:0.5>", strict=True).tags == ()


def test_vector_as_first_value_is_an_error():
    parsed = parse("<lora:x:1,0,1>")
    assert parsed.tags == () and "lbw=" in parsed.errors[0].message


def test_a_word_as_first_value_says_it_is_not_a_strength():
    """Found in a real A1111: `<lora:x:abc>` was told to move a block-weight vector."""
    parsed = parse("<lora:x:abc>")
    assert parsed.tags == ()
    message = parsed.errors[0].message
    assert "'abc' is not a strength" in message and "lbw=abc" in message
    assert parsed.errors[0].column == 9


@pytest.mark.parametrize("prompt,text", [
    ("(masterpiece:1.2), [cat:dog:0.5] AND a house BREAK sky", None),
    ("<hypernet:foo:1> <lora_unknown:x> <embedding> a < b > c", None),
    ("a <lora:x:1> b", "a b"),
    ("<lora:x:1> a", "a"),
    ("a <lora:x:1>", "a"),
    ("a <lora:x:1>, b", "a, b"),
    ("a<lora:x:1>b", "a b"),
    ("a <lora:x:1> <lora:y:1>  b", "a b"),
    ("line one <lora:x:1>\nline two", "line one\nline two"),
    ("(cat <lora:x:1>:1.2)", "(cat:1.2)"),
    ("a   b <lora:x>", "a   b"),  # spacing elsewhere is the user's
])
def test_text_outside_tags_is_untouched(prompt, text):
    assert parse(prompt).text == (prompt if text is None else text)


def test_non_string_prompt_is_a_type_error():
    with pytest.raises(TypeError):
        parse(None)


def test_region_parse_on_its_own():
    region, err = parse_region("mask1 + !left*0.5")
    assert err is None and region is not None
    region, err = parse_region("mask1 +")
    assert region is None and err.column == 8 and err.snippet.endswith("^")


def test_missing_mask_and_network_are_compile_errors():
    ctx = CompileContext(steps=2, masks=frozenset({"m1"}), networks=frozenset({"a"}))
    plan = compile_prompt("<lora:a:region=m1+left> <lora:a:region=m2> <lora:b>", ctx)
    assert len(plan.networks) == 1
    messages = [e.message for e in plan.errors]
    assert any("'m2'" in m for m in messages) and any("'b'" in m for m in messages)


def test_unknown_names_say_what_they_may_have_meant():
    """Issue 16 item 10: unknown network, model and mask names, each with a "did you mean"."""
    ctx = CompileContext(steps=2, masks=frozenset({"face_mask"}),
                         networks=frozenset({"pixel_art", "sunset"}), models=frozenset({"anime_v3"}))
    plan = compile_prompt("<lora:pixelart:1> <model:anime_v2:0.5> <lora:sunset:region=face_msk>"
                          " <model:sunset:1>", ctx)
    messages = [e.message for e in plan.errors]
    assert "did you mean 'pixel_art'?" in messages[0] and "did you mean 'anime_v3'?" in messages[1]
    assert "no mask named 'face_msk'; did you mean 'face_mask'?" in messages[2]
    assert "no model network named 'sunset'" in messages[3]  # a LoRA's name is no checkpoint's
    assert plan.networks == ()


def test_word_in_a_positional_slot_is_read_as_an_lbw_preset():
    # lora-block-weight's legacy <lora:name:1:PRESET>; an unknown word is a compile error there
    plan = compile_prompt("<lora:x:0.5:abc>", CompileContext(steps=2))
    assert plan.networks == ()
    assert "unknown lbw preset 'abc'" in plan.errors[0].message and plan.errors[0].column == 13


def test_step_range_and_start_overlap_warns():
    parsed = parse("<lora:x:step=5-10:start=3>")
    w = parsed.tags[0].window
    assert (w.start.value, w.last.value) == (3, 10)
    assert len(parsed.errors) == 1 and "'start' is given twice" in parsed.errors[0].message


def test_thousands_of_tags_are_capped_with_a_clear_error():
    from netweave.network.plan import MAX_NETWORKS, CompileContext, compile_prompt
    prompt = "a " + " ".join(f"<lora:n{i}:0.5@0,1@0.5:in=0>" for i in range(3000))
    plan = compile_prompt(prompt, CompileContext(steps=30))
    assert len(plan.networks) == MAX_NETWORKS
    (cap,) = [e for e in plan.errors if "at most" in e.message]
    assert cap.severity == "error" and "2936 from here on are ignored" in cap.message
    assert prompt[cap.column - 1:].startswith(f"<lora:n{MAX_NETWORKS}:")


@pytest.mark.parametrize("prompt,column,number", [
    ("<lora:x:1e30>", 9, "1e30"),  # a strength no weight survives
    ("<lora:x:te=1e400>", 12, "1e400"),  # overflows to infinity
    ("<lora:x:0@0,1@5e3>", 15, "5e3"),
    ("<lora:x:x=-2000>", 11, "-2000"),
    ("<lora:x:region=left*1e9>", 21, "1e9"),
    ("<lora:x:lbw=1,0,1e6>", 17, "1e6"),
])
def test_numbers_beyond_the_bound_refuse_their_tag_where_they_stand(prompt, column, number):
    parsed = parse(prompt + " <lora:ok:0.5>")
    assert [t.name for t in parsed.tags] == ["ok"]
    (err,) = parsed.errors
    assert err.severity == "error" and err.column == column, (err.column, err.message)
    assert f"'{number}' is out of range" in err.message and "1000" in err.message


def test_the_bound_keeps_every_real_number():
    parsed = parse("<lora:x:te=-1000:unet=1000:0@0,1@1000:region=left*2.5:x=0.7>")
    assert not [e for e in parsed.errors if e.severity == "error"], parsed.errors
