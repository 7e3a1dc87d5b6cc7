"""`python -m netweave …`: the command line.

explain PROMPT --steps N [--hires-steps M] [--arch sd1|sd2|sdxl] [--json] [--png FILE]
prints the compiled plan. Exit status 0 even when the prompt has errors (they are part of
the output); 2 for bad command-line arguments.

inspect FILE [--json] says what NetWeave makes of a network or checkpoint file; exit 1 with
`error` set when it cannot be loaded.

bench [--quick] [--device cpu|cuda] [--json] times the engine's strategies side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from ..network.blocks import BLOCKS, parse_preset_file
from ..network.explain import explain_table, heatmap
from ..network.plan import CompileContext, compile_prompt
from ..parser import INTERPOLATIONS


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not ≥ 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m netweave",
                                     description="NetWeave: LoRA tags compiled into one plan.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="print the plan a prompt compiles to")
    ex.add_argument("prompt", help="a prompt with <lora:…>, <lyco:…>, <loractl:…>, <model:…> tags")
    ex.add_argument("--steps", type=_positive, required=True, help="sampling steps")
    ex.add_argument("--hires-steps", type=_positive, default=None, help="hires-fix pass steps")
    ex.add_argument("--arch", choices=sorted(BLOCKS), default="sd1", help="block layout")
    ex.add_argument("--seed", type=int, default=0, help="seed for lbw's random R and U values")
    ex.add_argument("--interp", choices=INTERPOLATIONS, default=None,
                    help="default interpolation (else step; linear for loractl)")
    ex.add_argument("--presets", type=argparse.FileType("r", encoding="utf-8"), default=None,
                    help="lora-block-weight presets file (NAME:v,v,… lines)")
    ex.add_argument("--strict", action="store_true", help="treat warnings as errors")
    ex.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    ex.add_argument("--png", metavar="FILE", default=None, help="write the heatmap to FILE")
    ins = sub.add_parser("inspect", help="what NetWeave makes of a LoRA or checkpoint file")
    ins.add_argument("file", help="a .safetensors network or checkpoint, or a diffusers folder")
    ins.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bench = sub.add_parser("bench", help="engine benchmark: strategies timed side by side")
    bench.add_argument("--quick", action="store_true", help="a narrower UNet and 8 steps")
    bench.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    bench.add_argument("--json", action="store_true", help="print the result as one JSON object")
    bench.add_argument("--system-malloc", action="store_true",
                       help="keep glibc's default of returning freed memory to the OS")
    return parser


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return {"explain": explain_command, "inspect": inspect_command,
            "bench": bench_command}[args.command](args)


def explain_command(args) -> int:
    presets = parse_preset_file(args.presets.read()) if args.presets else {}
    ctx = CompileContext(arch=args.arch, steps=args.steps, hires_steps=args.hires_steps,
                         seed=args.seed, default_interp=args.interp, presets=presets,
                         strict=args.strict)
    plan = compile_prompt(args.prompt, ctx)
    if args.png:
        try:
            heatmap(plan).save(args.png, format="PNG")
        except OSError as exc:
            print(f"netweave: cannot write {args.png}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        print(explain_table(plan))
    return 0


# glibc returns big freed blocks to the OS and faults them back in on every forward; on a VM
# that swamps CPU timings (static LoRAs measured 1.40× base with it, 1.05× without).
# A1111's webui.sh preloads tcmalloc for the same reason.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 32), "MALLOC_TRIM_THRESHOLD_": str(2 ** 36),
                     "MALLOC_TOP_PAD_": str(2 ** 30)}


def bench_command(args) -> int:
    if sys.platform.startswith("linux") and not args.system_malloc and \
            any(k not in os.environ for k in KEEP_FREED_MEMORY):
        # glibc reads these at start: run again with them set
        os.execve(sys.executable, [sys.executable, "-m", "netweave", *sys.argv[1:]],
                  {**os.environ, **KEEP_FREED_MEMORY})
    from ..network.bench import run, table  # builds an SD1.5 UNet: only when asked

    result = run(quick=args.quick, device=args.device, steps=8 if args.quick else 20, repeats=3)
    print(json.dumps(result) if args.json else table(result))
    return 0


def inspect_command(args) -> int:
    from ..network.inspect import inspect  # loads diffusers: only when asked

    report = inspect(args.file)
    if args.json:
        print(json.dumps(report))
    elif report["error"]:
        print(f"error: {report['error']}")
    else:
        meta = report["metadata"]
        print(f"{report['file']}: {report['kind']} for {report['architecture'] or 'an unknown model'}")
        print(f"  layers: {report['layers']}  algorithms: "
              + ", ".join(f"{k} {v}" for k, v in sorted(report["algorithms"].items())))
        if meta.get("trigger_words"):
            print("  trigger words: " + ", ".join(meta["trigger_words"]))
        for key in report["unmatched_keys"][:20]:
            print(f"  unmatched: {key}")
        if len(report["unmatched_keys"]) > 20:
            print(f"  … and {len(report['unmatched_keys']) - 20} more unmatched keys")
    return 1 if report["error"] else 0
