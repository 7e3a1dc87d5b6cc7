"""10,000 random and mutated prompts: parse and compile return their documented types and
never raise."""
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from netweave.network.plan import CompileContext, Plan, compile_parsed
from netweave.parser import Diagnostic, Prompt, Tag, parse

SEEDS = [
    "<lora:pixel:te=0.1@0,0.6@0.5:unet=1:in=0:mid=1:out=0:region=mask1>",
    "<model:anime_v3:0.7> a cat", "<loractl:x:0@0~1@0.5;0@1:hr=1@0,0@1>",
    "<lora:n:1:lbw=1,0,R,U,X+0.2,X-1,0,0,0,0,0,0,0,0,0,0,0:x=0.5:step=5-10>",
    "(a:1.2) <lyco:sub/dir name:0.5:0.3:8> [a:b:0.5] AND c BREAK <lora:q:region=!(a+b)&left*0.5>",
    "<lora:n:start=0.25:stop=75%:interp=ease_in_out:neg=0:IN04=0.5:BASE=0:OUT11=0@1,1@30>",
]
ALPHABET = "<>:=@~,;%!&+*()-_. /\\\t\n\x00\x7féß0123456789abcdefXRUloramyctdeinpsuwx" \
           "LORAMODELYCOTBASEINOUT"
CONTEXTS = [CompileContext(arch="sd1", steps=20, hires_steps=5),
            CompileContext(arch="sdxl", steps=3, strict=True, masks=frozenset({"mask1"}))]


def mutate(rng, text):
    chars = list(text)
    for _ in range(rng.randint(1, 5)):
        op = rng.random()
        i = rng.randint(0, len(chars))
        if op < 0.4:
            chars.insert(i, rng.choice(ALPHABET))
        elif op < 0.7 and chars:
            del chars[min(i, len(chars) - 1)]
        elif op < 0.85 and chars:
            j = rng.randint(0, len(chars))
            chars[i:i] = chars[min(i, j):max(i, j)][:20]
        elif chars:
            chars[min(i, len(chars) - 1)] = rng.choice(ALPHABET)
    return "".join(chars)


def check(prompt):
    parsed = parse(prompt)
    assert isinstance(parsed, Prompt) and isinstance(parsed.text, str)
    assert all(isinstance(t, Tag) for t in parsed.tags)
    for e in parsed.errors:
        assert isinstance(e, Diagnostic) and e.severity in ("error", "warning")
        assert 1 <= e.column <= len(prompt) + 1 and "^" in e.snippet and e.message
    for ctx in CONTEXTS:
        plan = compile_parsed(parsed, prompt, ctx)
        assert isinstance(plan, Plan)
        for n in plan.networks:
            assert all(len(v) == ctx.steps for v in n.base.strength.values())
    return parsed


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
