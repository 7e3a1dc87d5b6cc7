"""Random and mutated input: parse and compile return their documented types and never raise;
the fuzzers of fuzz.py (parser, regions, files, API) run briefly."""
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz import ALPHABET, CONTEXTS, SEEDS, mutate
from fuzz import check_prompt as check
from netweave.network.plan import compile_parsed
from netweave.parser import parse


def test_ten_thousand_random_and_mutated_prompts():
    rng = random.Random(1234)
    tags_seen = errors_seen = 0
    for i in range(10_000):
        if i % 4 == 0:
            prompt = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60)))
        else:
            prompt = mutate(rng, " ".join(rng.sample(SEEDS, rng.randint(1, 3))))
        parsed = check(prompt)
        tags_seen += len(parsed.tags)
        errors_seen += len(parsed.errors)
    assert tags_seen > 1000 and errors_seen > 1000  # both paths were exercised


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_unicode(prompt):
    check(prompt)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(SEEDS + ["<", ">", ":", "<lora:", "=", "@"]), max_size=8))
def test_glued_fragments(parts):
    check("".join(parts))


# ---- the fuzzers of tests/fuzz.py, briefly (the notes report long runs) --------------------

def test_fuzz_parser_briefly():
    from fuzz import fuzz_parser
    stats = fuzz_parser(2000, 7)
    assert stats["tags"] > 200 and stats["problems"] > 200


def test_fuzz_region_compiler_briefly():
    from fuzz import fuzz_regions
    stats = fuzz_regions(300, 7)
    assert stats["compiled"] > 100 and stats["missing mask"] > 10


def test_fuzz_network_files_briefly():
    from fuzz import fuzz_files
    stats = fuzz_files(300, 7)
    refused = sum(v for k, v in stats.items() if k.endswith("refused"))
    assert refused > 150 and stats["inputs"] == 300


def test_fuzz_http_api_briefly(tmp_path):
    from fuzz import fuzz_api
    stats = fuzz_api(150, 7, root=tmp_path)
    assert any(k.startswith("POST txt2img: 200") for k in stats)
    assert any(k.startswith("PUT masks: 200") for k in stats)
    assert sum(v for k, v in stats.items() if ": 4" in k) > 50


def test_http_api_driven_by_hypothesis(tmp_path_factory):
    """The same random requests, drawn by hypothesis (so a failure shrinks to a small one)."""
    from fuzz import ApiTarget, _request

    target = ApiTarget(tmp_path_factory.mktemp("api"))
    seen = set()

    @settings(max_examples=120, deadline=None, database=None)
    @given(st.randoms(use_true_random=False))
    def one_request(rng):
        seen.add(target.send(*_request(rng)))

    one_request()
    target.finish()
    assert any(": 200" in s for s in seen) and any(": 4" in s for s in seen), seen


def test_deep_region_nesting_is_refused_at_its_column():
    from netweave.network.plan import compile_prompt
    deep = "<lora:a:1:region=" + "!(" * 40 + "left" + ")" * 40 + "> ok <lora:b:1:region=!(!(left))>"
    plan = compile_prompt(deep, CONTEXTS[0])
    assert [e.column for e in plan.errors] == [11]
    assert "nests 41 levels deep; at most 32" in plan.errors[0].message
    assert [n.name for n in plan.networks] == ["b"]


def test_complement_of_a_strengthened_region_is_not_negative():
    import numpy as np
    from netweave.network.regions import evaluate
    region = compile_parsed(parse("<lora:a:region=!(left*3)>"), "", CONTEXTS[0]).networks[0].region
    a = evaluate(region, (4, 4), {})
    assert a.min() == 0 and a[:, 2:].min() == 1
