"""Our pipeline against diffusers' on the full-size architecture with random weights (a benchmark, not a test).

Both load the same hub-layout folder (written once, random weights from seed 0) and upscale the same
input with the same prompt, generator and settings. Every run is a fresh process, ours and theirs
alternating (which goes first alternates too), so that neither inherits the other's caches or heap;
each process loads, then times one call and reads its peak resident set size (Linux VmHWM, reset
after loading: the call's peak, with the weights the process holds). Medians over the repeats.

    .venv/bin/python bench/compare.py [--repeats 3] [--cases 256-g9,...|all] [--folder DIR] [--out bench/results]

Cases (reference/diffusers-reference.md §3.6 for single-forward timings):

    256-g9    128 → 256 px, SD latents in, 10 steps, guidance 9 (batch 2 through the UNet)
    256-g0    the same at guidance 0 (one unconditional pass per step)
    256-rgb   the same with a 128 px RGB image in, through the VAE encoder
    1024      512 → 1024 px, 2 steps, guidance 9: peak memory at the largest output (default settings:
              max_memory "auto": no tiles here; our VAE decodes in row bands, latent_upscaler.streaming)
    1024-one-pass  the same with our VAE decoding in one pass (vae.stream_min_pixels = None), as diffusers
    1024-tiles    the same with our max_memory="3.5GiB"; only with --cases (no tiles either since the
              streamed decode: the estimate fits)
    256-bf16  256-g9 in bfloat16, both pipelines (the sampler's arithmetic stays float32 in both)

Then, in this process: the CPU's matrix-multiply peak (``torch.mm``, float32 and bfloat16) and each
UNet's achieved GFLOP/s at 32×32 and 64×64 latents (batch 2, float32; FLOPs counted with
``torch.utils.flop_counter`` on the evaluation timed, attention matmuls included; ours without its
packed weights, which the counter does not see). Writes
``compare.json`` and ``compare.md`` to ``--out``. The default cases take about 30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "a photo of an astronaut riding a horse"

CASES: Dict[str, Dict[str, Any]] = {
    "256-g9": dict(input="latents", side=128, steps=10, guidance=9.0, dtype="float32"),
    "256-g0": dict(input="latents", side=128, steps=10, guidance=0.0, dtype="float32"),
    "256-rgb": dict(input="rgb", side=128, steps=10, guidance=9.0, dtype="float32"),
    "1024": dict(input="latents", side=512, steps=2, guidance=9.0, dtype="float32"),
    "256-bf16": dict(input="latents", side=128, steps=10, guidance=9.0, dtype="bfloat16"),
    "1024-one-pass": dict(input="latents", side=512, steps=2, guidance=9.0, dtype="float32", ours_stream=False),
    "1024-tiles": dict(input="latents", side=512, steps=2, guidance=9.0, dtype="float32", ours_max_memory="3.5GiB"),
}
DEFAULT_CASES = ("256-g9", "256-g0", "256-rgb", "1024", "1024-one-pass", "256-bf16")


# ------------------------------------------------------------------------------------------------
# child: one pipeline, one call


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(impl: str, case_name: str, folder: str, save: Optional[str]) -> Dict[str, Any]:
    import numpy as np
    import torch

    case = CASES[case_name]
    dtype = getattr(torch, case["dtype"])
    if impl == "ours":
        from latent_upscaler import StableDiffusionLatentUpscalePipeline
    else:
        from diffusers import StableDiffusionLatentUpscalePipeline
    load_start = time.perf_counter()
    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(folder, torch_dtype=dtype)
    load_seconds = time.perf_counter() - load_start
    pipe.set_progress_bar_config(disable=True)
    extra = {"max_memory": case["ours_max_memory"]} if impl == "ours" and "ours_max_memory" in case else {}
    if impl == "ours" and case.get("ours_stream") is False:
        pipe.vae.stream_min_pixels = None

    g = torch.Generator().manual_seed(0)
    side = case["side"]
    if case["input"] == "latents":
        image = torch.randn(1, 4, side // 8, side // 8, generator=g).to(dtype)
    else:
        image = torch.rand(1, 3, side, side, generator=g).to(dtype)  # RGB in [0, 1]

    rss_before = _rss_bytes("VmRSS")
    exact_peak = _reset_peak()
    start = time.perf_counter()
    out = pipe(prompt=PROMPT, image=image, num_inference_steps=case["steps"], guidance_scale=case["guidance"],
               generator=torch.Generator().manual_seed(1), output_type="np", **extra).images
    seconds = time.perf_counter() - start
    peak = _rss_bytes("VmHWM") if exact_peak else _maxrss_bytes()
    if save:
        np.save(save, np.asarray(out, dtype=np.float32))
    return {"seconds": seconds, "load_seconds": load_seconds, "peak_bytes": peak, "rss_before_bytes": rss_before,
            "peak_is_call_only": exact_peak}


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# ------------------------------------------------------------------------------------------------
# parent: alternate fresh processes


def ensure_folder(folder: str) -> None:
    """Write the hub-layout folder with random weights (seed 0) unless it is there."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return
    from latent_upscaler.random_weights import random_pipeline

    print(f"writing the full-size architecture with random weights to {folder} ...", flush=True)
    random_pipeline(seed=0).save_pretrained(folder)


def spawn(impl: str, case: str, folder: str, save: Optional[str]) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--case", case, "--folder", folder]
    if save:
        cmd += ["--save", save]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} {case} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cases(cases: List[str], repeats: int, folder: str, outputs: str) -> Dict[str, Any]:
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {c: {"ours": [], "diffusers": []} for c in cases}
    for r in range(repeats):
        for i, case in enumerate(cases):
            order = ["ours", "diffusers"] if (r + i) % 2 == 0 else ["diffusers", "ours"]
            for impl in order:
                save = os.path.join(outputs, f"{case}-{impl}.npy") if r == 0 else None
                result = spawn(impl, case, folder, save)
                runs[case][impl].append(result)
                print(f"  repeat {r + 1}/{repeats} {case:10s} {impl:9s} {result['seconds']:8.2f} s "
                      f"peak {result['peak_bytes'] / 2**30:6.2f} GiB", flush=True)
    return runs


def summarise(runs: Dict[str, Any], outputs: str) -> Dict[str, Any]:
    import numpy as np

    def load(case: str, impl: str):
        path = os.path.join(outputs, f"{case}-{impl}.npy")
        return np.load(path) if os.path.exists(path) else None

    def max_diff(a, b) -> Optional[float]:
        return None if a is None or b is None else float(np.abs(a - b).max())

    table = {}
    for case, by_impl in runs.items():
        row = {}
        for impl, results in by_impl.items():
            row[impl] = {
                "seconds": statistics.median(r["seconds"] for r in results),
                # diffusers maps the weight files and reads them during the first call; we read them
                # while loading: loading plus the call is the fair whole
                "load_and_call_seconds": statistics.median(r["seconds"] + r["load_seconds"] for r in results),
                "peak_gib": statistics.median(r["peak_bytes"] for r in results) / 2**30,
                "resident_before_gib": statistics.median(r["rss_before_bytes"] for r in results) / 2**30,
                "all_seconds": [r["seconds"] for r in results],
            }
        row["time_ratio"] = row["ours"]["seconds"] / row["diffusers"]["seconds"]
        row["load_and_call_ratio"] = row["ours"]["load_and_call_seconds"] / row["diffusers"]["load_and_call_seconds"]
        row["peak_ratio"] = row["ours"]["peak_gib"] / row["diffusers"]["peak_gib"]
        row["max_abs_diff_ours_vs_diffusers"] = max_diff(load(case, "ours"), load(case, "diffusers"))
        table[case] = row
    diffs = {
        "bf16_vs_fp32_ours": max_diff(load("256-bf16", "ours"), load("256-g9", "ours")),
        "bf16_vs_fp32_diffusers": max_diff(load("256-bf16", "diffusers"), load("256-g9", "diffusers")),
        "streamed_vs_one_pass_ours_1024": max_diff(load("1024", "ours"), load("1024-one-pass", "ours")),
        "tiles_vs_default_ours_1024": max_diff(load("1024-tiles", "ours"), load("1024", "ours")),
    }
    if "256-bf16" in table and "256-g9" in table:
        diffs["bf16_over_fp32_time_ours"] = table["256-bf16"]["ours"]["seconds"] / table["256-g9"]["ours"]["seconds"]
    return {"cases": table, "differences": diffs}


# ------------------------------------------------------------------------------------------------
# matrix-multiply peak and UNet GFLOP/s (in this process)


def matmul_peak(dtype, sizes=(2048, 4096), repeats: int = 5) -> float:
    """Best GFLOP/s of ``torch.mm`` on square matrices (2n³ FLOPs)."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def _sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, length, d = q_shape
    return 2 * b * h * length * k_shape[-2] * (d + v_shape[-1])  # q kᵀ and (softmax) v


def unet_gflops(folder: str, latents=(32, 64), repeats: int = 3) -> Dict[str, Any]:
    """Each UNet's forward (batch 2, float32) as the pipelines call it per step, alternating."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from latent_upscaler.conditioning import PACK_MAX_AREA
    from latent_upscaler.loading.weights import load_model
    from latent_upscaler.models.ops import packed_convolutions
    from latent_upscaler.models.unet import KUNet

    ours = load_model(KUNet, os.path.join(folder, "unet"))
    theirs = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
    sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    results = {}
    for side in latents:
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(2, 8, side, side, generator=g)
        states = torch.randn(2, 77, 768, generator=g)
        cond = torch.randn(2, 896, generator=g)
        t = torch.tensor(0.25)
        # as the pipelines evaluate them at every step: ours with the text's keys and values and the
        # packed weights kept from the first step (UpscalerConditioning), diffusers' as it is
        context, packed = ours.text_context(states), {}

        def our_step():
            if side * side > PACK_MAX_AREA:  # as UpscalerConditioning: packed weights for small latents only
                return ours(sample, t, context, timestep_cond=cond)
            with packed_convolutions(packed):
                return ours(sample, t, context, timestep_cond=cond)

        calls = {
            "ours": our_step,
            "diffusers": lambda: theirs(sample, t, encoder_hidden_states=states, timestep_cond=cond).sample,
        }
        # FlopCounterMode does not see oneDNN's packed-weight convolution (mkldnn::_convolution_pointwise):
        # our FLOPs are counted on the same evaluation without packed weights (the same arithmetic)
        counted = dict(calls, ours=lambda: ours(sample, t, context, timestep_cond=cond))
        with torch.no_grad():
            flops, times = {}, {name: [] for name in calls}
            for name, call in calls.items():
                call()  # the first step: fills our caches, warms both
                with FlopCounterMode(display=False, custom_mapping=sdpa) as counter:
                    counted[name]()
                flops[name] = counter.get_total_flops()
            for _ in range(repeats):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
        results[f"{side}x{side}"] = {
            name: {"gflop": flops[name] / 1e9, "seconds": statistics.median(times[name]),
                   "gflops": flops[name] / 1e9 / statistics.median(times[name])}
            for name in calls
        }
    return results


# ------------------------------------------------------------------------------------------------
# report


def machine() -> Dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", "unknown", "x86_64"):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "diffusers": _version("diffusers")}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def markdown(report: Dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, {m['threads']} threads; "
             f"torch {m['torch']}, diffusers {m['diffusers']}, Python {m['python']}. "
             f"Medians of {report['repeats']} fresh processes per pipeline and case, alternating.", "",
             "| case | ours call (s) | diffusers call (s) | time ratio | load + call ratio | ours peak (GiB) | "
             "diffusers peak (GiB) | peak ratio | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, row in report["results"]["cases"].items():
        diff = row["max_abs_diff_ours_vs_diffusers"]
        lines.append(f"| {case} | {row['ours']['seconds']:.2f} | {row['diffusers']['seconds']:.2f} | "
                     f"{row['time_ratio']:.2f} | {row['load_and_call_ratio']:.2f} | {row['ours']['peak_gib']:.2f} | "
                     f"{row['diffusers']['peak_gib']:.2f} | {row['peak_ratio']:.2f} | "
                     f"{'–' if diff is None else f'{diff:.1e}'} |")
    d = report["results"]["differences"]
    lines += ["", "Output differences (max |Δ| of float pixels in [0, 1]): " + ", ".join(
        f"{k} {v:.3g}" for k, v in d.items() if v is not None)]
    peak = report.get("matmul_peak_gflops")
    if peak:
        lines += ["", f"Matrix-multiply peak (torch.mm, {m['threads']} threads): float32 {peak['float32']:.0f} GFLOP/s, "
                  f"bfloat16 {peak['bfloat16']:.0f} GFLOP/s.", "",
                  "| UNet forward, batch 2, fp32 | ours GFLOP | ours s | ours GFLOP/s (of peak) | diffusers GFLOP | "
                  "diffusers s | diffusers GFLOP/s (of peak) |", "|---|---|---|---|---|---|---|"]
        for size, r in report["unet"].items():
            o, t = r["ours"], r["diffusers"]
            lines.append(f"| latent {size} | {o['gflop']:.1f} | {o['seconds']:.3f} | {o['gflops']:.0f} "
                         f"({o['gflops'] / peak['float32']:.2f}) | {t['gflop']:.1f} | {t['seconds']:.3f} | "
                         f"{t['gflops']:.0f} ({t['gflops'] / peak['float32']:.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help=f"comma-separated, from {', '.join(CASES)}; 'all' for every one")
    p.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "latent-upscaler-bench", "full-random"),
                   help="hub-layout folder with random weights (written if missing)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--skip-gflops", action="store_true", help="leave out the matmul peak and UNet GFLOP/s")
    p.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        print(json.dumps(run_child(args.child, args.case, args.folder, args.save)))
        return

    import torch

    cases = list(CASES) if args.cases == "all" else [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    os.makedirs(args.out, exist_ok=True)
    ensure_folder(args.folder)
    report: Dict[str, Any] = {"machine": machine(), "repeats": args.repeats, "settings": {c: CASES[c] for c in cases}}
    with tempfile.TemporaryDirectory() as outputs:
        runs = run_cases(cases, args.repeats, args.folder, outputs)
        report["results"] = summarise(runs, outputs)
    if not args.skip_gflops:
        report["matmul_peak_gflops"] = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
        report["unet"] = unet_gflops(args.folder)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
