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

# Ten tags as most prompts carry them: A1111 weights, a few named keys.
TYPICAL = (
    "masterpiece, a red fox in a snowy forest <lora:fox:0.8> <lora:snow:0.5:0.3> "
    "<lora:detail:te=0.5:unet=1> <lyco:watercolor:0.6> <model:anime_v3:0.3> <lora:eyes:1> "
    "<lora:light:0.7:dyn=16> <lora:hands:0.4> <lora:grain:unet=0.2> <lora:bokeh:0.9>"
)
# Ten tags using every feature: schedules, vectors, windows, regions, hires curves.
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
    print(f"10 tags, SD1, 30 steps + 15 hires steps, median of {args.repeat} runs; "
          "cold = a prompt never seen, warm = the same prompt again")
    print(f"  {'':<20} {'typical tags':>14} {'every feature':>15}")
    for label, cold in (("parse, cold", True), ("parse + plan, cold", True),
                        ("parse, warm", False), ("parse + plan, warm", False)):
        times = []
        for prompt in (TYPICAL, PROMPT):
            plan = compile_prompt(prompt, ctx)
            assert len(plan.networks) == 10 and not plan.errors, plan.errors
            job = (lambda p=prompt: parser_parse(p)) if label.startswith("parse,") else \
                (lambda p=prompt: compile_prompt(p, ctx))
            times.append(_time(job, args.repeat, _clear if cold else None))
        print(f"  {label:<20} {times[0]:11.3f} ms {times[1]:12.3f} ms")
    print("  target: parse + plan <= 1 ms")


if __name__ == "__main__":
    main()
