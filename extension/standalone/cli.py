"""`python -m netweave …`: the command line.

explain PROMPT --steps N [--hires-steps M] [--arch sd1|sd2|sdxl|flux|chroma] [--json]
[--png FILE] [--sigmas S,S,… [--hires-sigmas S,S,…] | --shift X] prints the compiled plan; the
sigmas (given, or a flow schedule shifted by X) place positions by noise level (`s0.5`).
Exit status 0 even when the prompt has errors (they are part of the output); 2 for bad
command-line arguments.

inspect FILE [--json] says what NetWeave makes of a network or checkpoint file; exit 1 with
`error` set when it cannot be loaded.

bench [--arch sd|flux|zimage] [--quick | --size 512|1024] [--repeats N] [--steps N] [--device cpu|cuda]
[--json] times the engine's strategies side by side.

generate --prompt P --out FILE [...] makes an image with the standalone host (no checkpoint:
the embedded default model; `--checkpoint demo-flux`: the embedded Flux-architecture demo); serve [--port 7860] runs its page and A1111-style API on
127.0.0.1 (`--listen` or `--host ADDR` only with `--api-auth USER:PASS`). Both read LoRAs from
--lora-dir and `<model:…>` checkpoints from --model-dir.

Whatever is asked is bounded: steps up to 1000, prompts up to 100,000 characters, a presets
file up to 1 MiB of UTF-8 text; anything else exits 2 with a message.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from ...network.blocks import BLOCKS, parse_preset_file
from ...network.explain import explain_table, heatmap
from ...network.plan import MAX_STEPS, CompileContext, compile_prompt
from ...network.quantize import FORMATS, QuantizeError, parse_format, quantize_model
from ...network.sigma import flow_sigmas
from ...parser import INTERPOLATIONS
from .limits import DEFAULT_BODY_MB, DEFAULT_WORK, Limits
from .samplers import Sampler

MAX_PROMPT = 100_000
MAX_PRESETS_BYTES = 2 ** 20


def _whole(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high}")
        return value
    return parse


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _sigma_list(text: str):
    """'1,0.8,0.5,0.2': one sigma per step (checked against the steps once they are known)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of numbers like 1,0.8,0.5") \
            from None
    return values


def _prompt(text: str) -> str:
    if len(text) > MAX_PROMPT:
        raise argparse.ArgumentTypeError(f"the prompt is longer than {MAX_PROMPT:,} characters")
    return text


_positive = _whole(1, 2 ** 31)
_steps = _whole(1, MAX_STEPS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m netweave",
                                     description="NetWeave: LoRA tags compiled into one plan.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="print the plan a prompt compiles to")
    ex.add_argument("prompt", type=_prompt,
                    help="a prompt with <lora:…>, <lyco:…>, <loractl:…>, <model:…> tags")
    ex.add_argument("--steps", type=_steps, required=True, help="sampling steps")
    ex.add_argument("--hires-steps", type=_steps, default=None, help="hires-fix pass steps")
    ex.add_argument("--arch", choices=sorted(BLOCKS), default="sd1", help="block layout")
    ex.add_argument("--seed", type=int, default=0, help="seed for lbw's random R and U values")
    ex.add_argument("--interp", choices=INTERPOLATIONS, default=None,
                    help="default interpolation (else step; linear for loractl)")
    ex.add_argument("--presets", metavar="FILE", default=None,
                    help="lora-block-weight presets file (NAME:v,v,… lines)")
    ex.add_argument("--strict", action="store_true", help="treat warnings as errors")
    noise = ex.add_mutually_exclusive_group()
    noise.add_argument("--sigmas", type=_sigma_list, default=None, metavar="S,S,…",
                       help="the sigma at each step of the pass, for positions like s0.5")
    noise.add_argument("--shift", type=_positive_number, default=None, metavar="X",
                       help="sigmas of a flow schedule (Flux, SD3) shifted by X: "
                            "X·t/(1+(X−1)·t) with t = 1 − k/steps (1: no shift)")
    ex.add_argument("--hires-sigmas", type=_sigma_list, default=None, metavar="S,S,…",
                    help="the sigma at each step of the hires pass")
    ex.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    ex.add_argument("--png", metavar="FILE", default=None, help="write the heatmap to FILE")
    ins = sub.add_parser("inspect", help="what NetWeave makes of a LoRA or checkpoint file")
    ins.add_argument("file", help="a .safetensors network or checkpoint, or a diffusers folder")
    ins.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bench = sub.add_parser("bench", help="engine benchmark: strategies timed side by side")
    bench.add_argument("--arch", choices=("sd", "flux", "zimage"), default="sd",  # bench.Family's
                       help="sd: SD1.5/SDXL UNets; flux: a Flux.1-width transformer (3072 wide, "
                            "24 heads) with 2 double + 4 single blocks, so that it, its bare twin "
                            "and the pristine copies (17 GiB at most in fp32) fit a 24 GiB box; "
                            "zimage: a Z-Image Turbo-width transformer (3840 wide, 30 heads), 4 "
                            "of 30 layers + 2 + 2 refiners (18.5 GiB peak in fp32)")
    bench.add_argument("--quick", action="store_true",
                       help="a narrow model on a small latent (SD1.5 32², Flux 8² tokens), "
                            "8 steps (same as --size quick)")
    bench.add_argument("--size", choices=("quick", "512", "1024"), default="512",
                       help="512: SD1.5 at a 64² latent, Flux and Z-Image 1024 image + 512 "
                            "text tokens; 1024: SDXL at a 128² latent, Flux and Z-Image 4096 + "
                            "512 tokens (20 steps; Z-Image 8)")
    bench.add_argument("--steps", type=int, default=None, choices=range(1, 1001), metavar="N",
                       help="steps of each pass instead of the size's (a short smoke run)")
    bench.add_argument("--repeats", type=int, default=5, choices=range(1, 101), metavar="N",
                       help="runs of each workload, interleaved (median and spread reported)")
    bench.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    bench.add_argument("--json", action="store_true", help="print the result as one JSON object")
    bench.add_argument("--quantize", type=_quant_format, default=None, metavar="FORMAT",
                       help="add the quantized rows, in this format (" + " ".join(FORMATS) + ")")
    bench.add_argument("--system-malloc", action="store_true",
                       help="keep glibc's default of returning freed memory to the OS")
    gen = sub.add_parser("generate", help="make an image with the standalone host")
    gen.add_argument("--prompt", type=_prompt, required=True, help="the prompt, tags included")
    gen.add_argument("--negative", type=_prompt, default="", help="the negative prompt")
    gen.add_argument("--steps", type=_steps, default=20)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--cfg", type=float, default=None,
                     help="CFG scale; on Flux dev the guidance it embeds (default: the model's: "
                          "7, Flux dev 3.5, Chroma 5, Flux schnell 1)")
    gen.add_argument("--sampler", choices=[s.value for s in Sampler], default=Sampler.EULER.value)
    gen.add_argument("--width", type=_positive, default=None, help="default: the model's size")
    gen.add_argument("--height", type=_positive, default=None)
    gen.add_argument("--mask", action="append", default=[], metavar="NAME=PATH",
                     help="a mask for region=NAME (repeatable)")
    gen.add_argument("--out", required=True, help="the PNG to write (parameters in its text)")
    srv = sub.add_parser("serve", help="the standalone page and API on 127.0.0.1")
    srv.add_argument("--port", type=_whole(1, 65535), default=7860)
    where = srv.add_mutually_exclusive_group()
    where.add_argument("--listen", action="store_const", const="0.0.0.0", dest="host",
                       help="serve on every network interface (needs --api-auth)")
    where.add_argument("--host", default="127.0.0.1",
                       help="the address to serve on (beyond loopback only with --api-auth)")
    srv.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS…]",
                     help="HTTP basic authentication for the API and the page")
    srv.add_argument("--max-work", type=_positive_number, default=DEFAULT_WORK,
                     help="most work one request may ask for, in megapixel-steps "
                          "(width × height × steps × images / 10⁶; default %(default)s)")
    srv.add_argument("--max-body-mb", type=_positive_number, default=DEFAULT_BODY_MB,
                     help="largest request body in MiB (default %(default)s)")
    for p in (gen, srv):
        p.add_argument("--checkpoint", default=None,
                       help="a .safetensors SD1/SDXL checkpoint or a transformer (Flux, Chroma, "
                            "Z-Image, Qwen-Image, SD3, Wan), a diffusers folder (SD1, SD2, SDXL, "
                            "Flux, Chroma, Z-Image, Qwen-Image, SD3/3.5, Wan 2.1/2.2), or "
                            "demo-flux (default: the embedded model)")
        p.add_argument("--quantize", type=_quant_format, default=None, metavar="FORMAT",
                       help="quantize the model's linear layers on load, every tag still "
                            "applies: " + " ".join(FORMATS))
        p.add_argument("--components", default=None, metavar="FOLDER",
                       help="for a single-file transformer: the diffusers folder of its family "
                            "its VAE, text encoders and tokenizers come from")
        p.add_argument("--lora-dir", action="append", default=[], help="LoRA folder (repeatable)")
        p.add_argument("--model-dir", action="append", default=[],
                       help="folder of checkpoints for <model:…> (repeatable)")
        p.add_argument("--mask-dir", default=os.path.join(os.path.expanduser("~"), ".netweave",
                                                          "masks"),
                       help="where named masks are kept")
        p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    return parser


def _quant_format(name: str):
    try:
        return parse_format(name)
    except QuantizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return {"explain": explain_command, "inspect": inspect_command, "bench": bench_command,
            "generate": generate_command, "serve": serve_command}[args.command](args)


def _read_presets(path: str) -> dict:
    """ValueError with the reason for a presets file that is unreadable, too big or not text."""
    if os.path.exists(path) and not os.path.isfile(path):  # a folder, or a FIFO that would block
        raise ValueError(f"--presets {path}: not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PRESETS_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"--presets {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PRESETS_BYTES:
        raise ValueError(f"--presets {path}: larger than {MAX_PRESETS_BYTES // 2 ** 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--presets {path}: not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise ValueError(f"--presets {path}: a binary file, not NAME:v,v,… lines")
    return parse_preset_file(text)


def explain_command(args) -> int:
    from ..settings import Settings
    try:
        presets = _read_presets(args.presets) if args.presets else {}
    except ValueError as exc:
        print(f"netweave: {exc}", file=sys.stderr)
        return 2
    sigmas, hires_sigmas = args.sigmas, args.hires_sigmas
    if args.shift is not None:
        sigmas = flow_sigmas(args.steps, args.shift)
        if args.hires_steps is not None and hires_sigmas is None:
            hires_sigmas = flow_sigmas(args.hires_steps, args.shift)
    try:
        ctx = CompileContext(arch=args.arch, steps=args.steps, hires_steps=args.hires_steps,
                             seed=args.seed, default_interp=args.interp, presets=presets,
                             strict=args.strict, sigmas=sigmas, hires_sigmas=hires_sigmas,
                             blend=Settings().blend / 100)  # as generate compiles it
    except ValueError as exc:  # sigmas that do not fit the steps
        print(f"netweave: {exc}", file=sys.stderr)
        return 2
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
    from ...devtools.bench import run, table  # builds a model: only when asked

    result = run("quick" if args.quick else args.size, device=args.device, repeats=args.repeats,
                 quantize=None if args.quantize is None else args.quantize.value,
                 arch=args.arch, steps=args.steps)
    print(json.dumps(result) if args.json else table(result))
    return 0


def inspect_command(args) -> int:
    from ...network.inspect import inspect  # loads diffusers: only when asked

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


def _host(args):
    """Model, folders and host from the generate/serve arguments (heavy imports: only here)."""
    # transformers warns about image processors the pipelines import but never use
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .host import DiffusersHost
    from ..library import Library
    from ..masks import MaskStore
    from .flow_models import DEMO_FLUX_NAME, demo_flux_library
    from .models import demo_library, load_model
    from ..settings import Settings

    model = load_model(args.checkpoint, args.components)
    if args.quantize is not None:
        count = sum(quantize_model(tree, args.quantize) for tree in model.trees().values())
        print(f"netweave: {count} linear layers quantized as {args.quantize.value}", file=sys.stderr)
    loras, models = list(args.lora_dir), list(args.model_dir)
    if args.checkpoint is None:  # the default model brings networks to try every tag on
        demo = demo_library()
        loras, models = loras + [demo[0]], models + [demo[1]]
    elif model.name == DEMO_FLUX_NAME:  # and so does the Flux demo
        loras = loras + [demo_flux_library()]
    library = Library(loras, models, base=os.getcwd())  # messages name folders from here
    masks = MaskStore(args.mask_dir)  # the command line's: never changed over HTTP
    limits = Limits(int(args.max_body_mb * 2 ** 20), args.max_work) if args.command == "serve" \
        else Limits(max_work=float("inf"))  # a command asks for what its user wants
    host = DiffusersHost(model, library, masks, device=args.device, settings=Settings(),
                         limits=limits)
    return host, library, masks


def generate_command(args) -> int:
    from PIL import PngImagePlugin

    from .host import Request
    from ..masks import MAX_BYTES, MaskError, check_mask_name, decode_image

    inline = {}
    for item in args.mask:
        name, sep, path = item.partition("=")
        try:
            if not sep:
                raise MaskError(f"--mask {item}: write NAME=PATH")
            if os.path.exists(path) and not os.path.isfile(path):
                raise MaskError(f"--mask {name}: {path} is not a regular file")
            with open(path, "rb") as f:  # decode_image refuses more than MAX_BYTES
                inline[check_mask_name(name)] = decode_image(f.read(MAX_BYTES + 1), f"--mask {name}")
        except (MaskError, OSError) as exc:
            print(f"netweave: {exc}", file=sys.stderr)
            return 2
    try:
        host, _, _ = _host(args)
    except (OSError, ValueError) as exc:
        print(f"netweave: cannot load the model: {exc}", file=sys.stderr)
        return 1
    size = host.model.size
    req = Request(prompt=args.prompt, negative_prompt=args.negative, steps=args.steps,
                  cfg_scale=host.model.default_cfg if args.cfg is None else args.cfg,
                  seed=args.seed, width=args.width or size,
                  height=args.height or size, masks=inline, sampler=Sampler(args.sampler))
    # the sampler's progress bar on a terminal (tqdm stays quiet when stderr is not one)
    host.model.pipe.set_progress_bar_config(disable=not sys.stderr.isatty(), desc="sampling",
                                            leave=False)
    try:
        result = host.txt2img(req)
    except ValueError as exc:
        print(f"netweave: {exc}", file=sys.stderr)
        return 2
    for problem in result.errors:
        print(f"netweave: {problem}", file=sys.stderr)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", result.infotexts[0])  # A1111's key: PNG Info reads it back
    try:
        result.images[0].save(args.out, format="PNG", pnginfo=meta)
    except OSError as exc:
        print(f"netweave: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(result.infotexts[0])
    print(f"wrote {args.out}")
    return 0


def serve_command(args) -> int:
    from .auth import parse_credentials
    from .server import check_address, serve

    try:
        auth = parse_credentials(args.api_auth) if args.api_auth is not None else []
        check_address(args.host, auth)
    except ValueError as exc:
        print(f"netweave: {exc}", file=sys.stderr)
        return 2
    try:
        host, library, masks = _host(args)
    except QuantizeError as exc:  # the format's package is missing
        print(f"netweave: {exc}", file=sys.stderr)
        return 2
    serve(host, library, masks, port=args.port, address=args.host, auth=auth)
    return 0
