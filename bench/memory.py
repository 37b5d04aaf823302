"""Peak memory of an upscale against output size: ours (automatic budget) and diffusers with and
without its VAE tiling; and the calibration of latent_upscaler.memory (a benchmark, not a test).

Every measurement runs in a fresh Python process that loads the models, resets its peak resident
set size (``/proc/self/clear_refs``), runs one thing, and reports ``VmHWM`` (the peak RSS, which
includes the weights and the Python/PyTorch runtime) and ``VmRSS`` before the work. The
architecture is the hub model's with random weights, float32, CPU; the input is a random-noise
image (fine detail everywhere) of half the output size; 1 sampler step with guidance (batch 2 in
the UNet) unless told otherwise: peak memory does not depend on the number of steps.

    .venv/bin/python bench/memory.py calibrate               # stage peaks at small sizes → memory.py's factors
    .venv/bin/python bench/memory.py run --sizes 512 1024    # whole upscales, table + plot
    .venv/bin/python bench/memory.py one --impl ours --out 2048 --max-memory 4GiB   # a single run

A configuration whose estimate exceeds the available memory is not started: it is reported as
"estimated X GiB, not run". Results go to bench/results/memory.json (merged run by run), a markdown
table (memory.md) and a plot (memory.png).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
GiB = 1024**3
IMPLS = ("ours", "diffusers", "diffusers-tiled")


# --------------------------------------------------------------------------------------------------
# In the child process


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    return _status("VmRSS")


def _model_folder(path: str) -> str:
    """The hub architecture with random weights, saved once, so that ours and diffusers load the same."""
    if not os.path.exists(os.path.join(path, "model_index.json")):
        from latent_upscaler.random_weights import random_pipeline

        random_pipeline(seed=0).save_pretrained(path)
    return path


def child_stage(args) -> dict:
    """One stage alone: ``unet`` (batch 2, latent side = size), ``decode`` (output pixels = size),
    ``encode`` (input pixels = size), ``mid`` (the decoder's conv_in + mid-block at latent side = size)."""
    import torch

    from latent_upscaler.conditioning import UpscalerConditioning, prepare_conditioning
    from latent_upscaler.denoiser import KarrasDenoiser
    from latent_upscaler.models.unet import KUNet, UNetConfig
    from latent_upscaler.models.vae import AutoencoderKL, VAEConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.size
    with torch.no_grad():
        if args.stage == "unet":
            model = KarrasDenoiser(UpscalerConditioning(KUNet(UNetConfig()).eval()))
            cond = prepare_conditioning(torch.randn(2, 4, n // 2, n // 2), torch.zeros(2), torch.randn(2, 768), None)
            cond["encoder_hidden_states"] = torch.randn(2, 77, 768)
            x, sigma = torch.randn(2, 4, n, n), torch.tensor(1.0)
            run = lambda: model(x, sigma, **cond)  # noqa: E731
        else:
            vae = AutoencoderKL(VAEConfig()).eval()
            if args.tile:
                vae.enable_tiling(args.tile, args.overlap or min(16, args.tile // 2))
            if args.stage == "decode":
                z = torch.randn(1, 4, n // 8, n // 8)
                run = lambda: vae.decode(z).sample  # noqa: E731
            elif args.stage == "encode":
                pixels = torch.rand(1, 3, n, n) * 2 - 1
                run = lambda: vae.encode(pixels).latent_dist.mean  # noqa: E731
            else:
                z = torch.randn(1, 4, n, n)
                from latent_upscaler.tiling import whole_mid_block

                run = lambda: whole_mid_block(vae.decoder.mid_block, vae.decoder.conv_in(z))  # noqa: E731
        before = _reset_peak()
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        del out
    peak = _status("VmHWM")
    return {"stage": args.stage, "size": n, "tile": args.tile, "before": before, "peak": peak,
            "growth": peak - before, "seconds": seconds}


def child_profile(args) -> dict:
    """Our pipeline at a small size, untiled, with each stage's peak above the RSS at the start of the
    call: what ``latent_upscaler.memory`` adds to the resident bytes it measures when planning."""
    import torch

    from latent_upscaler import StableDiffusionLatentUpscalePipeline
    from latent_upscaler.memory import release_freed_memory

    torch.set_num_threads(args.threads)
    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(_model_folder(args.model))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, args.out // 2, args.out // 2, generator=torch.Generator().manual_seed(0))
    growth = {}

    def hook(obj, name, stage):
        inner = getattr(obj, name)

        def measured(*a, **k):
            if stage in ("encode", "decode"):
                release_freed_memory()  # as TilingPlan.vae_tiling does before the VAE
            _reset_peak()
            out = inner(*a, **k)
            growth[stage] = max(growth.get(stage, 0), _status("VmHWM") - start)
            return out

        setattr(obj, name, measured)

    for obj, name, stage in ((pipe.text_encoder, "forward", "text"), (pipe.vae, "encode", "encode"),
                             (pipe.unet, "forward", "unet"), (pipe.vae, "decode", "decode")):
        hook(obj, name, stage)
    result = {"out": args.out, "growth": growth}
    call = _ours(pipe, image, args, result) if args.max_memory != "none" else (
        lambda: pipe(prompt="a photo", image=image, num_inference_steps=1, generator=torch.Generator().manual_seed(0)))
    start = _reset_peak()
    with torch.no_grad():
        call()
    result["start"], result["peak"] = start, _status("VmHWM")
    return result


def child_call(args) -> dict:
    """A whole upscale of a (size/2)² noise image to size² pixels."""
    import torch

    torch.set_num_threads(args.threads)
    folder = _model_folder(args.model)
    gen = torch.Generator().manual_seed(0)
    if args.input == "latents":  # SD latents of a (size/2)² image: no VAE encode
        image = torch.randn(1, 4, args.out // 16, args.out // 16, generator=gen)
    else:
        image = torch.rand(1, 3, args.out // 2, args.out // 2, generator=gen)  # pixels in [0, 1]
    result = {"impl": args.impl, "out": args.out, "steps": args.steps, "input": args.input,
              "max_memory": args.max_memory}
    if args.impl == "ours":
        from latent_upscaler import StableDiffusionLatentUpscalePipeline
        from latent_upscaler.memory import model_bytes

        pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(folder)
        result["weights"] = model_bytes(pipe.unet, pipe.vae, pipe.text_encoder)
        call = _ours(pipe, image, args, result)
    else:
        from diffusers import StableDiffusionLatentUpscalePipeline

        pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(folder)
        if args.impl == "diffusers-tiled":
            pipe.vae.enable_tiling()  # diffusers' latent upscale pipeline has no enable_vae_tiling()
        result["weights"] = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                                for p in m.parameters())
        call = lambda: pipe(prompt="a photo", image=image, num_inference_steps=args.steps,  # noqa: E731
                            generator=torch.Generator().manual_seed(0)).images[0]
    pipe.set_progress_bar_config(disable=True)
    result["before"] = _reset_peak()
    start = time.perf_counter()
    with torch.no_grad():
        out = call()
    result["seconds"] = time.perf_counter() - start
    result["peak"] = _status("VmHWM")
    result["size_out"] = list(out.size)
    return result


def _ours(pipe, image, args, result):
    """Our pipeline's call with ``max_memory`` and the tile options; the plan it makes (the same
    function, on the same inputs, just before) is recorded with its estimate."""
    import torch

    from latent_upscaler.memory import plan_tiling

    pipe.vae.tile_group_norm = args.group_norm  # the planned VAE tiling keeps it
    side = -(-args.out // 2 // 8 // 4) * 4  # padded low-res latent side (images.LATENT_MULTIPLE)
    options = dict(max_memory=None if args.max_memory == "none" else args.max_memory, tile_size=args.tile_size,
                   vae_tile_size=args.vae_tile_size)
    plan = plan_tiling(pipe, (side, side), 1, 2, pixel_input=image.shape[1] == 3, **options)
    result["plan"] = str(plan)
    result["estimate"] = plan.estimate.peak
    result["estimate_stages"] = plan.estimate.stages
    result["resident_at_plan"] = plan.estimate.resident
    return lambda: pipe(prompt="a photo", image=image, num_inference_steps=args.steps,
                        generator=torch.Generator().manual_seed(0), **options).images[0]


# --------------------------------------------------------------------------------------------------
# In the driver


def available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def spawn(argv, wait_for: int = 0, timeout: float = 6 * 3600) -> dict:
    """Run ``bench/memory.py child …`` in a fresh process once ``wait_for`` bytes are available."""
    while wait_for and available() < wait_for:
        print(f"  waiting: {available() / GiB:.1f} GiB available, {wait_for / GiB:.1f} GiB wanted", flush=True)
        time.sleep(60)
    cmd = [sys.executable, os.path.abspath(__file__), "child", *map(str, argv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode}


def _fit(points):
    """Least squares ``growth = intercept + slope · n`` over (n, growth) points."""
    n = len(points)
    mx, my = sum(p for p, _ in points) / n, sum(g for _, g in points) / n
    slope = sum((p - mx) * (g - my) for p, g in points) / sum((p - mx) ** 2 for p, _ in points)
    return slope, my - slope * mx


def calibrate(args) -> None:
    """Each stage's peak above the call's starting RSS, at three sizes, fitted linearly in the
    elements of its widest activation: slope / (that width × 4 bytes) = the *_LIVE factor,
    intercept = the stage's base. The VAE mid-block (tiled VAE only) is measured alone."""
    runs = []
    for out in args.sizes:
        r = spawn(["profile", "--out", out, "--threads", args.threads, "--model", args.model, "--max-memory", "none"])
        if "error" in r:
            print(out, "failed:", r["error"][-800:], flush=True)
            continue
        runs.append(r)
        print(f"{out} px: start {r['start'] / GiB:.2f} GiB; growth " +
              ", ".join(f"{k} {v / GiB:.3f}" for k, v in r["growth"].items()), flush=True)
    # elements per stage (batch × pixels × channels of the widest activation) for an output of side s
    elements = {"text": lambda s: 1, "encode": lambda s: (s // 2) ** 2 * 128, "unet": lambda s: 2 * (s // 8) ** 2 * 384,
                "decode": lambda s: s * s * 128}
    fits = {}
    for stage, count in elements.items():
        points = [(count(r["out"]), r["growth"][stage]) for r in runs if stage in r["growth"]]
        if stage == "text":
            fits[stage] = {"copies": 0.0, "base": max(g for _, g in points)}
            continue
        slope, intercept = _fit(points)
        fits[stage] = {"copies": slope / 4, "base": intercept}
    mids = []
    for size in (32, 48, 64, 96):
        r = spawn(["stage", "--stage", "mid", "--size", size, "--threads", args.threads])
        if "error" not in r:
            mids.append((size * size * 512, r["growth"]))
    slope, intercept = _fit(mids)
    fits["mid"] = {"copies": slope / 4, "base": intercept}
    for stage, f in fits.items():
        print(f"  {stage:7s} copies {f['copies']:.2f}  base {f['base'] / 2**20:.0f} MiB", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "memory_calibration.json"), "w") as f:
        json.dump({"fits": fits, "profiles": runs, "mid": mids, "machine": machine()}, f, indent=1)


def machine() -> str:
    import platform

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    total = 0
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    import torch

    return f"{cpu}, {os.cpu_count()} CPUs, {total / GiB:.0f} GiB RAM, torch {torch.__version__}"


def load_results() -> dict:
    path = os.path.join(RESULTS, "memory.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"runs": {}}


def save_results(results: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "memory.json"), "w") as f:
        json.dump(results, f, indent=1)


def run(args) -> None:
    results = load_results()
    results["machine"] = machine()
    for size in args.sizes:
        for impl in args.impls:
            key = f"{impl}@{size}"
            if key in results["runs"] and "peak" in results["runs"][key] and not args.again:
                continue
            need = estimate_peak(impl, size, results)
            if need is not None and need > available() * 0.95:
                results["runs"][key] = {"impl": impl, "out": size, "estimate": need, "not_run": True}
                print(f"{key}: estimated {need / GiB:.1f} GiB > {available() / GiB:.1f} GiB available: not run",
                      flush=True)
                save_results(results)
                continue
            print(f"{key}: running (estimate {'?' if need is None else f'{need / GiB:.1f} GiB'})", flush=True)
            r = spawn(["call", "--impl", impl, "--out", size, "--steps", args.steps, "--threads", args.threads,
                       "--model", args.model, "--max-memory", args.max_memory], wait_for=need or 0)
            if need is not None and "estimate" not in r:
                r["estimate"] = need
            results["runs"][key] = r
            save_results(results)
            print(f"  {json.dumps(r)[:400]}", flush=True)
    report(results)


def estimate_peak(impl: str, size: int, results: dict):
    """Ours: its own estimate (untiled, no budget), from a child that only plans. diffusers: linear in
    the output area through its two largest measured runs (their peaks are dominated by activations
    that grow with the area)."""
    if impl == "ours":
        return None  # ours plans within the available memory itself
    points = sorted((r["out"], r["peak"]) for r in results["runs"].values()
                    if r.get("impl") == impl and "peak" in r and r["out"] < size)
    if len(points) < 2:
        return None
    (s0, p0), (s1, p1) = points[-2:]
    slope = (p1 - p0) / (s1 * s1 - s0 * s0)
    return int(p1 + slope * (size * size - s1 * s1))


def report(results: dict) -> None:
    runs = results["runs"]
    sizes = sorted({r["out"] for r in runs.values()})
    lines = ["| output | " + " | ".join(IMPLS) + " |", "|---|" + "---|" * len(IMPLS)]
    for size in sizes:
        cells = []
        for impl in IMPLS:
            r = runs.get(f"{impl}@{size}")
            if r is None:
                cells.append("–")
            elif r.get("not_run"):
                cells.append(f"est. {r['estimate'] / GiB:.1f} GiB, not run")
            elif "peak" in r and "estimate" in r:
                cells.append(f"{r['peak'] / GiB:.2f} GiB (est. {r['estimate'] / GiB:.2f}; {r['seconds'] / 60:.1f} min)")
            elif "peak" in r:
                cells.append(f"{r['peak'] / GiB:.2f} GiB ({r['seconds'] / 60:.1f} min)")
            else:
                cells.append("failed")
        lines.append(f"| {size} px | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    with open(os.path.join(RESULTS, "memory.md"), "w") as f:
        f.write(table + "\n\nMachine: " + results.get("machine", "?") + "\n")
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, style in zip(IMPLS, ("o-", "s--", "^:")):
        measured = sorted((r["out"], r["peak"] / GiB) for r in runs.values() if r.get("impl") == impl and "peak" in r)
        estimated = sorted((r["out"], r["estimate"] / GiB) for r in runs.values()
                           if r.get("impl") == impl and r.get("not_run"))
        if measured:
            line, = ax.plot(*zip(*measured), style, label=impl)
            if estimated:
                ax.plot([measured[-1][0], *[s for s, _ in estimated]], [measured[-1][1], *[e for _, e in estimated]],
                        ":", color=line.get_color(), alpha=0.6)
                ax.plot(*zip(*estimated), "x", color=line.get_color(), label=f"{impl} (estimate, not run)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("output side (px)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("Peak memory of a ×2 upscale (CPU, fp32, random weights)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "memory.png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("child")
    c.add_argument("kind", choices=("stage", "call", "profile"))
    c.add_argument("--stage", choices=("unet", "decode", "encode", "mid"))
    c.add_argument("--size", type=int)
    c.add_argument("--tile", type=int)
    c.add_argument("--overlap", type=int)
    c.add_argument("--impl", choices=IMPLS)
    c.add_argument("--out", type=int)
    c.add_argument("--steps", type=int, default=1)
    c.add_argument("--input", choices=("rgb", "latents"), default="rgb")
    c.add_argument("--max-memory", default="auto", help="a budget, 'auto', or 'none' (profile: no plan at all)")
    c.add_argument("--tile-size", type=int)
    c.add_argument("--vae-tile-size", type=int)
    c.add_argument("--group-norm", default="sampled", choices=("sampled", "global", "tile"))
    c.add_argument("--model", default="/tmp/latent-upscaler-random")
    c.add_argument("--threads", type=int, default=2)
    pr = sub.add_parser("profile", help="per-stage peaks of one of our upscales")
    pr.add_argument("--out", type=int, required=True)
    pr.add_argument("--max-memory", default="none")
    pr.add_argument("--tile-size", type=int)
    pr.add_argument("--vae-tile-size", type=int)
    pr.add_argument("--group-norm", default="sampled", choices=("sampled", "global", "tile"))
    pr.add_argument("--threads", type=int, default=2)
    pr.add_argument("--model", default="/tmp/latent-upscaler-random")
    for name in ("calibrate", "run", "one"):
        s = sub.add_parser(name)
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--model", default="/tmp/latent-upscaler-random")
        s.add_argument("--steps", type=int, default=1)
        s.add_argument("--max-memory", default="auto")
    sub.choices["calibrate"].add_argument("--sizes", type=int, nargs="+", default=[256, 384, 512])
    sub.choices["run"].add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    sub.choices["run"].add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    sub.choices["run"].add_argument("--again", action="store_true", help="rerun configurations already measured")
    sub.choices["one"].add_argument("--impl", choices=IMPLS, default="ours")
    sub.choices["one"].add_argument("--out", type=int, required=True)
    sub.choices["one"].add_argument("--input", choices=("rgb", "latents"), default="rgb",
                                    help="an RGB image of half the output size, or its SD latents")
    sub.choices["one"].add_argument("--tile-size", type=int)
    sub.choices["one"].add_argument("--vae-tile-size", type=int)
    sub.choices["one"].add_argument("--group-norm", default="sampled", choices=("sampled", "global", "tile"),
                                    help="the VAE tiles' GroupNorm statistics (the same peak memory either way)")
    args = p.parse_args()
    if args.command == "child":
        result = {"stage": child_stage, "call": child_call, "profile": child_profile}[args.kind](args)
        print("RESULT " + json.dumps(result), flush=True)
    elif args.command == "calibrate":
        calibrate(args)
    elif args.command == "run":
        run(args)
    elif args.command == "profile":
        argv = ["profile", "--out", args.out, "--threads", args.threads, "--model", args.model,
                "--max-memory", args.max_memory, "--group-norm", args.group_norm]
        for flag, value in (("--tile-size", args.tile_size), ("--vae-tile-size", args.vae_tile_size)):
            if value:
                argv += [flag, value]
        r = spawn(argv)
        print(json.dumps(r, indent=1))
    else:
        argv = ["call", "--impl", args.impl, "--out", args.out, "--steps", args.steps, "--threads", args.threads,
                "--model", args.model, "--max-memory", args.max_memory, "--group-norm", args.group_norm,
                "--input", args.input]
        for flag, value in (("--tile-size", args.tile_size), ("--vae-tile-size", args.vae_tile_size)):
            if value:
                argv += [flag, value]
        r = spawn(argv)
        r["machine"] = machine()
        print(json.dumps(r, indent=1))
        results = load_results()
        results.setdefault("single", []).append(r)
        save_results(results)


if __name__ == "__main__":
    main()
