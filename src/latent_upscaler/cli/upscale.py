"""``latent-upscale [upscale]``: files, folders and globs of images, each made twice as large."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import secrets
import signal
import sys
from typing import Any, Dict, List, Optional

from .. import __version__
from ..batch import DEFAULT_NAME
from ..files import DEFAULT_QUALITY, OUTPUT_FORMATS
from ..loading.hub import DEFAULT_MODEL
from .common import BAD_INPUT, DTYPES, FAILED, OK, PROG, fail, pick_device, pick_dtype, quiet_libraries, warn

DESCRIPTION = f"""\
Double the resolution of images with the Stable Diffusion x2 latent upscaler.

commands:
  {PROG} [upscale] INPUT... (-o FILE | --output-dir DIR) [options]   upscale (the default command)
  {PROG} info IMAGE...                                               the settings stored in an output
  {PROG} convert CHECKPOINT -o FOLDER [...]                          original checkpoint -> model folder
  ({PROG} COMMAND --help for each)
"""

EXAMPLES = f"""\
examples:
  {PROG} photo.png -o photo_2x.png --steps 20 --guidance-scale 0
  {PROG} photos/ --output-dir big/ --prompt "a castle on a hill" --seed 7
  {PROG} "shots/**/*.jpg" --recursive --output-dir big/ --name "{{stem}}_{{seed}}.webp" --quality 90
  find renders -name "*.png" | {PROG} - --output-dir big/ --batch-size 4 --json > summary.json
  {PROG} photos/ --output-dir big/ --prompt-file prompts.txt --dry-run
  {PROG} photos/ --output-dir smoke/ --random-weights --steps 2     (outputs are noise)

Outputs: --output-dir keeps the subfolders of a folder input; --name fills in {{stem}} (the input's
name), {{index}} (its position among the inputs, from 0), {{seed}} and {{prompt}} (made safe for file
names); the extension picks PNG (default), JPEG or WebP. An existing output is never replaced without
--overwrite: a rerun skips what is done, so a stopped run loses nothing. Images are written to a
temporary file and renamed, so there is never a half-written one.

Seeds: image number i (its {{index}}) is upscaled with seed S + i, S being --seed (or a fresh one,
printed); the result does not depend on --batch-size nor on which images were already done. The
settings and the seed are stored in each output: `{PROG} info OUTPUT` shows them and the command
that makes that image again.

The model is {DEFAULT_MODEL} from the Hugging Face Hub (downloaded once into its cache), or a
local folder in the same layout given with --model.

Exit status: 0 all done; 1 the model could not be loaded or an output not written; 2 bad arguments,
or some inputs missing or unreadable (the others are done); 130 interrupted.
"""

#: pipeline argument -> the option that sets it; also how `info` writes a command back
OPTIONS = {
    "negative_prompt": "--negative-prompt", "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale",
    "sampler": "--sampler", "sigma_schedule": "--sigma-schedule", "eta": "--eta", "tol_scale": "--tol-scale",
    "noise_level": "--noise-level", "noise_aug_type": "--noise-aug-type", "faithful": "--faithful",
    "max_memory": "--max-memory", "tile_size": "--tile-size", "vae_tile_size": "--vae-tile-size",
    "tile_overlap": "--tile-overlap",
}


def pipeline_defaults() -> Dict[str, Any]:
    from ..pipeline import StableDiffusionLatentUpscalePipeline

    params = inspect.signature(StableDiffusionLatentUpscalePipeline.__call__).parameters
    return {name: params[name].default for name in OPTIONS}


def build_parser() -> argparse.ArgumentParser:
    from ..conditioning import NOISE_AUG_TYPES
    from ..sampling import SAMPLERS
    from ..schedules import SCHEDULES

    default = pipeline_defaults()
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EXAMPLES,
                                usage="%(prog)s [upscale] INPUT... (-o FILE | -d DIR) [options]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files (PNG, JPEG, WebP, ...; any size), folders, glob patterns (quoted), "
                        "or - for paths read from standard input, one a line")

    g = p.add_argument_group("inputs and outputs")
    g.add_argument("-r", "--recursive", action="store_true",
                   help="take the images of subfolders too; '**' in patterns spans folders")
    g.add_argument("-o", "--output", metavar="FILE", help="the output file, for a single input image")
    g.add_argument("-d", "--output-dir", metavar="DIR", help="the folder of the outputs, for any number of inputs")
    g.add_argument("--name", default=DEFAULT_NAME, metavar="PATTERN",
                   help="output file name in --output-dir: {stem} {index} {seed} {prompt}; the extension "
                        f"({', '.join(OUTPUT_FORMATS)}) picks the format, PNG when none (default: %(default)s)")
    g.add_argument("--quality", type=int, metavar="Q",
                   help=f"JPEG and WebP quality, 1-100 (default: {DEFAULT_QUALITY})")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="skip inputs whose output exists: the default with --output-dir; with -o an "
                        "existing output is an error unless --resume")
    g.add_argument("--dry-run", action="store_true",
                   help="list inputs, outputs, seeds and prompts, and stop before loading the model")

    g = p.add_argument_group("what the upscale does")
    g.add_argument("-p", "--prompt", default="", metavar="TEXT", help="text describing the images (default: none)")
    g.add_argument("--prompt-file", metavar="FILE",
                   help="one prompt a line, one line per input image in the order they are listed "
                        "(see --dry-run)")
    g.add_argument("-n", "--negative-prompt", default=default["negative_prompt"], metavar="TEXT",
                   help="what to steer away from")
    g.add_argument("--steps", type=int, metavar="N", default=default["num_inference_steps"],
                   help="sampling steps (default: %(default)s)")
    g.add_argument("--guidance-scale", type=float, metavar="G", default=default["guidance_scale"],
                   help="classifier-free guidance; 0 ignores the prompt (default: %(default)s)")
    g.add_argument("--sampler", choices=sorted(SAMPLERS), default=default["sampler"], metavar="NAME",
                   help=f"{', '.join(sorted(SAMPLERS))}; euler is diffusers' (default: %(default)s)")
    g.add_argument("--sigma-schedule", choices=list(SCHEDULES), default=default["sigma_schedule"], metavar="NAME",
                   help=f"σ spacing: {', '.join(SCHEDULES)} (default: %(default)s, the model's own)")
    g.add_argument("--eta", type=float, metavar="X", default=default["eta"],
                   help="ancestral noise of the stochastic samplers (default: the sampler's)")
    g.add_argument("--tol-scale", type=float, metavar="X", default=default["tol_scale"],
                   help="error tolerance of dpm_adaptive (default: %(default)s)")
    g.add_argument("--noise-level", type=float, metavar="X", default=default["noise_level"],
                   help="noise augmentation of the input latents, σ; above 0 needs a model converted "
                        "from the original checkpoint (default: %(default)s)")
    g.add_argument("--noise-aug-type", choices=NOISE_AUG_TYPES, metavar="TYPE", default=default["noise_aug_type"],
                   help="gaussian adds the noise; fake only tells the model (default: %(default)s)")
    g.add_argument("--faithful", action="store_true",
                   help="the original notebook's CLIP padding mask, guidance and σ range")
    g.add_argument("--seed", type=int, metavar="S",
                   help="seed of the first image; image i gets seed + i (default: a fresh one, printed)")

    g = p.add_argument_group("model and hardware")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="ID_OR_FOLDER",
                   help="hub id or local folder in the hub layout (default: %(default)s)")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    g.add_argument("--variant", help="weight files variant of --model, e.g. fp16")
    g.add_argument("--random-weights", action="store_true",
                   help="no download: the model's architecture (of --model when it is a folder) with "
                        "random weights, for smoke runs and benchmarks; OUTPUTS ARE NOISE")
    g.add_argument("--dtype", choices=DTYPES, default="auto", metavar="DTYPE",
                   help=f"{', '.join(DTYPES)}; auto = float16 on CUDA, float32 elsewhere")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, ... (default: the best available)")
    g.add_argument("--batch-size", type=int, metavar="N", default=1,
                   help="images of the same size upscaled together (default: %(default)s)")

    g.add_argument("--max-memory", default=default["max_memory"], metavar="SIZE",
                   help="memory the upscale may use in all, weights included, e.g. 6GiB or 4000MB; 'auto' "
                        "(default): what the process holds plus 90%% of what is free; 'none': no limit, no tiles. "
                        "The UNet and VAE run in the largest tiles that fit; an image that cannot fit fails "
                        "before any work, saying what would")
    g.add_argument("--tile-size", type=int, metavar="PX",
                   help="UNet tiles of PX output pixels (a multiple of 64), whatever --max-memory chooses")
    g.add_argument("--vae-tile-size", type=int, metavar="PX",
                   help="VAE tiles of PX output pixels (a multiple of 8), whatever --max-memory chooses")
    g.add_argument("--tile-overlap", type=int, metavar="PX",
                   help="pixels shared by neighbouring tiles (default: a quarter of a UNet tile, 64 for the VAE)")

    g = p.add_argument_group("messages")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="only errors (default: a line per image, and progress bars over images and steps "
                        "when standard error is a terminal)")
    g.add_argument("--json", action="store_true",
                   help="print a JSON summary on standard output (per image: input, output, seed, "
                        "seconds, status)")
    g.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    previous = _stop_on_sigterm()
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm():
    """Make SIGTERM (a `kill`, a job scheduler) stop the run as Ctrl-C does, cleaning up its temporary
    file; returns the previous handler (None where it cannot be set)."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, stop)
    except (ValueError, AttributeError, OSError):  # not the main thread, or no SIGTERM
        return None


def _main(args) -> int:
    problem = _check_arguments(args)
    if problem:
        return fail(problem, BAD_INPUT)
    bars = not args.quiet and sys.stderr.isatty()
    if not bars:
        quiet_libraries()

    from .. import batch
    from ..files import find_inputs

    inputs, problems = find_inputs(args.inputs, recursive=args.recursive, stdin=sys.stdin, exclude=args.output_dir)
    for message in problems:
        warn(f"error: {message}")
    if args.output is not None and len(inputs) > 1:
        return fail(f"-o names one output file, but {len(inputs)} input images were given; "
                    "use --output-dir DIR for several", BAD_INPUT)
    try:
        prompts = _prompts(args, len(inputs))
    except (OSError, ValueError) as e:
        return fail(str(e), BAD_INPUT)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    try:
        jobs = batch.plan(inputs, seed=seed, prompts=prompts, output_dir=args.output_dir, name=args.name,
                          output_file=args.output, overwrite=args.overwrite)
    except ValueError as e:
        return fail(str(e), BAD_INPUT)

    resume = args.resume if args.resume is not None else args.output is None
    existing = [j for j in jobs if j.status == batch.SKIPPED]
    if existing and not resume:
        more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
        return fail(f"{existing[0].output} exists{more}; pass --overwrite to replace, or --resume to skip "
                    "existing outputs", BAD_INPUT)
    if args.dry_run:
        return _dry_run(args, jobs, problems, seed)

    say = (lambda message: None) if args.quiet else _say
    if args.seed is None and jobs:
        say(f"seed {seed} (pass --seed {seed} to repeat this run)")
    if existing:
        say(f"{len(existing)} of {len(jobs)} outputs exist already and are skipped (--overwrite replaces them)")
    for job in jobs:
        if job.status == batch.FAILED:
            warn(f"error: {job.error}")

    code = OK
    if any(j.status == batch.PENDING for j in jobs):
        code = _upscale(args, jobs, say, bars)
    return _finish(args, jobs, problems, seed, code)


def _check_arguments(args) -> Optional[str]:
    if (args.output is None) == (args.output_dir is None):
        return ("give -o FILE (one input image) or --output-dir DIR (any number)" if args.output is None
                else "give either -o FILE or --output-dir DIR, not both")
    if args.output is not None and os.path.isdir(args.output):
        return f"-o {args.output} is a folder; use --output-dir {args.output}"
    if args.steps < 1:
        return "--steps must be at least 1"
    if args.batch_size < 1:
        return "--batch-size must be at least 1"
    if args.seed is not None and args.seed < 0:
        return "--seed must be 0 or more"
    from ..memory import parse_bytes

    try:
        parse_bytes(args.max_memory)
    except ValueError as e:
        return str(e).replace("max_memory", "--max-memory", 1)
    for option in ("tile_size", "vae_tile_size", "tile_overlap"):
        value = getattr(args, option)
        if value is not None and value < (0 if option == "tile_overlap" else 1):
            return f"--{option.replace('_', '-')} must be {'0 or more' if option == 'tile_overlap' else 'positive'}"
    if args.prompt_file is not None and args.prompt:
        return "give --prompt or --prompt-file, not both"
    from ..files import check_name_pattern

    try:
        if args.output is None:
            ext = check_name_pattern(args.name)
        else:
            ext = os.path.splitext(args.output)[1].lower() or ".png"
    except ValueError as e:
        return str(e)
    if ext not in OUTPUT_FORMATS:
        return f"cannot write {ext} files; use one of {', '.join(OUTPUT_FORMATS)}"
    if args.quality is not None:
        if OUTPUT_FORMATS[ext] == "PNG":
            return "--quality applies to JPEG and WebP outputs; PNG is lossless"
        if not 1 <= args.quality <= 100:
            return "--quality must be between 1 and 100"
    if args.random_weights and args.model != DEFAULT_MODEL and not os.path.isdir(args.model):
        return (f"--random-weights takes the architecture of a local folder or of {DEFAULT_MODEL}; "
                f"{args.model!r} is neither")
    return None


def _prompts(args, n_images: int) -> List[str]:
    if args.prompt_file is None:
        return [args.prompt]
    with open(args.prompt_file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) != n_images:
        raise ValueError(f"{args.prompt_file} has {len(lines)} lines for {n_images} input images; give one "
                         "prompt a line, in the order of the inputs (--dry-run lists them)")
    return lines


def _say(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _load(args):
    """The pipeline on the chosen device and dtype, and what the metadata says about the model."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model  # reproducible from anywhere
    context = {"version": __version__, "model": model, "revision": args.revision, "variant": args.variant,
               "dtype": str(dtype).removeprefix("torch."), "device": device.type}
    if args.random_weights:
        from ..random_weights import WARNING, random_pipeline

        warn(WARNING)
        architecture = args.model if os.path.isdir(args.model) else None
        pipe = random_pipeline(architecture, dtype=dtype)
        context["random_weights"] = True
    else:
        from ..pipeline import StableDiffusionLatentUpscalePipeline

        pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(args.model, dtype=dtype, revision=args.revision,
                                                                    variant=args.variant)
    return pipe.to(device), context


def _upscale(args, jobs, say, bars: bool) -> int:
    from .. import batch
    from ..configuration import ConfigError
    from ..files import remove_stale_temporaries
    from ..loading.hub import ModelNotAvailableError
    from ..models.base import WeightsMismatchError

    try:
        pipe, context = _load(args)
    except (ModelNotAvailableError, OSError, ConfigError, WeightsMismatchError, ValueError, RuntimeError,
            AssertionError) as e:  # torch says "Torch not compiled with CUDA enabled" with an AssertionError
        what = "build the model" if args.random_weights else f"load the model {args.model!r}"
        return fail(f"cannot {what}:\n{e}")
    remove_stale_temporaries({os.path.dirname(os.path.abspath(j.output)) for j in jobs if j.status == batch.PENDING})
    call_args = {name: getattr(args, option.removeprefix("--").replace("-", "_")) for name, option in OPTIONS.items()}

    def report(job) -> None:
        if job.status == batch.DONE:
            w, h = job.size
            say(f"{job.input} ({w}×{h}) → {job.output} ({2 * w}×{2 * h}), seed {job.seed}, {job.seconds:.2f} s")
        else:
            _say(f"{PROG}: error: {job.error}")

    try:
        batch.run(pipe, jobs, call_args, batch_size=args.batch_size, context=context, overwrite=args.overwrite,
                  quality=DEFAULT_QUALITY if args.quality is None else args.quality,
                  progress=bars, on_result=report)
    except (ValueError, TypeError) as e:
        return fail(str(e), BAD_INPUT)
    except KeyboardInterrupt:
        warn("interrupted; the outputs written so far are complete, and a rerun continues from there")
        return 130
    return OK


def _finish(args, jobs, problems: List[str], seed: int, code: int) -> int:
    from .. import batch

    n = batch.counts(jobs)
    if code == OK and (problems or n[batch.FAILED]):
        code = BAD_INPUT if problems or any(j.unreadable for j in jobs) else FAILED
    if args.json:
        summary = {"version": __version__, "model": args.model, "seed": seed, "counts": n,
                   "problems": problems, "images": [j.record() for j in jobs]}
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    if not args.quiet or code != OK:
        parts = [f"{n[batch.DONE]} upscaled", f"{n[batch.SKIPPED]} already there", f"{n[batch.FAILED]} failed"]
        if n[batch.PENDING]:
            parts.append(f"{n[batch.PENDING]} not started")
        if problems:
            parts.append(f"{len(problems)} input argument{'s' if len(problems) > 1 else ''} matched nothing")
        if len(jobs) > 1 or problems or code != OK:
            warn(", ".join(parts))
    return code


def _dry_run(args, jobs, problems: List[str], seed: int) -> int:
    from .. import batch

    if args.json:
        print(json.dumps({"seed": seed, "problems": problems,
                          "images": [{**j.record(), "prompt": j.prompt} for j in jobs]}, indent=2, ensure_ascii=False))
    else:
        for job in jobs:
            state = {batch.PENDING: "", batch.SKIPPED: "  (exists: skipped)"}.get(job.status, f"  ({job.error})")
            print(f"{job.index:>4}  seed {job.seed}  {job.input} → {job.output}  prompt {job.prompt!r}{state}")
    failed = problems or any(j.status == batch.FAILED for j in jobs)
    return BAD_INPUT if failed else OK
