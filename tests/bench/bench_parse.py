"""Benchmark: parse + plan of a 10-tag prompt (target ≤ 1 ms on a CI-sized machine).

    .venv/bin/python tests/bench/bench_parse.py [--repeat 2000]

Prints cold (caches cleared before every run: grammar work for every tag) and warm (the same
prompt again, as a WebUI re-parses it several times per generation) medians, side by side.
"""
import argparse
import statistics
import time

from netweave.network import schedule
from netweave.network.plan import CompileContext, compile_prompt
from netweave.parser import parse as parser_parse
from netweave.parser.parse import _parse_tag, parse_weights

PROMPT = (
    "masterpiece, (a red fox:1.2) in a snowy forest, BREAK soft light "
    "<lora:pixel:te=0.1@0,0.6@0.5:unet=1:in=0:mid=1:out=0:region=mask1> "
    "<lora:detail:0.8:lbw=1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0> "
    "<loractl:light:0@0,1@0.5,0.2@1:hr=1@0,0@1> "
    "<lyco:style/watercolor:0.6:0.4:16> "
    "<model:anime_v3:0.7:region=left&!top*0.5> "
    "<lora:eyes:1:stop=0.6:IN04=0:OUT05=0.5> "
    "<lora:hands:0.5:step=5-20:interp=cosine> "
    "<lora:bg:te=0.3:unet=0.9:neg=0> "
    "<lora:glow:1:lbw=OUTALL:start=10> "
    "<lora:grain:0.4@0,0.8@15:interp=ease_in_out>"
)


def _time(fn, repeat, before=None):
    samples = []
    for _ in range(repeat):
        if before:
            before()
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def _clear():
    _parse_tag.cache_clear()
    parse_weights.cache_clear()
    schedule.evaluate.cache_clear()
    schedule.window_mask.cache_clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args()
    ctx = CompileContext(arch="sd1", steps=30, hires_steps=15)
    plan = compile_prompt(PROMPT, ctx)
    assert len(plan.networks) == 10 and not plan.errors, plan.errors
    rows = [
        ("parse, cold", _time(lambda: parser_parse(PROMPT), args.repeat, _clear)),
        ("parse + plan, cold", _time(lambda: compile_prompt(PROMPT, ctx), args.repeat, _clear)),
        ("parse, warm", _time(lambda: parser_parse(PROMPT), args.repeat)),
        ("parse + plan, warm", _time(lambda: compile_prompt(PROMPT, ctx), args.repeat)),
    ]
    print(f"10 tags, SD1, 30 steps + 15 hires steps, median of {args.repeat} runs")
    for name, ms in rows:
        print(f"  {name:<20} {ms:7.3f} ms   ({ms:.2f}× the 1 ms target)")


if __name__ == "__main__":
    main()
