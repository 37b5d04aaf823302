"""The VAE decode in row bands (latent_upscaler.streaming) against the one-pass decode: time, peak
memory and pixels (a benchmark, not a test).

Each decode runs in a fresh process: the full-size VAE with its default random initialisation,
latents from seed 0 (white noise), float32, CPU; the peak is the growth of the peak resident set size
over the decode (``/proc/self/clear_refs`` then ``VmHWM``). Both modes' pixels are saved and compared.

    .venv/bin/python bench/streaming.py [--sizes 512 768 1024] [--stream-only 2048] [--threads 2]

Writes bench/results/streaming.json and streaming.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MiB = 1024**2


def child(mode: str, size: int, threads: int, save: str) -> dict:
    import torch

    sys.path.insert(0, HERE)
    from memory import _reset_peak, _status

    from latent_upscaler.models.vae import AutoencoderKL, VAEConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig()).eval()
    vae.stream_min_pixels = 1 if mode == "streamed" else None
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = _reset_peak()
        start = time.perf_counter()
        out = vae.decode(z).sample
        seconds = time.perf_counter() - start
        peak = _status("VmHWM")
    torch.save(out, save)
    return {"mode": mode, "size": size, "seconds": seconds, "growth_mib": (peak - before) / MiB,
            "output_elements_mib": out.numel() * 4 / MiB}


def spawn(mode: str, size: int, threads: int, save: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--size", str(size), "--threads",
           str(threads), "--save", save]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1024], help="output sides, both modes")
    p.add_argument("--stream-only", type=int, nargs="*", default=[2048], help="output sides, streamed only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child")
    p.add_argument("--size", type=int)
    p.add_argument("--save")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.threads, args.save)), flush=True)
        return

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes + args.stream_only:
            modes = ("streamed",) if size in args.stream_only else ("streamed", "one pass")
            results = {}
            for mode in modes:
                save = os.path.join(tmp, f"{mode.replace(' ', '-')}-{size}.pt")
                results[mode] = spawn(mode, size, args.threads, save)
                print(json.dumps(results[mode]), flush=True)
            row = {"size": size, **{m: r for m, r in results.items()}}
            if len(modes) == 2:
                a = torch.load(os.path.join(tmp, f"streamed-{size}.pt"))
                b = torch.load(os.path.join(tmp, f"one-pass-{size}.pt"))
                row["max_abs_diff"] = float((a - b).abs().max())
                row["mean_abs_one_pass"] = float(b.abs().mean())
            rows.append(row)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "streaming.json"), "w") as f:
        json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)
    lines = ["| output | streamed s | one pass s | time ratio | streamed peak growth | one pass peak growth | "
             "memory ratio | max \\|Δ\\| (mean \\|pixel\\|) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s, o = row["streamed"], row.get("one pass")
        if o is None:
            lines.append(f"| {row['size']} px | {s['seconds']:.1f} | – | – | {s['growth_mib']:.0f} MiB | – | – | – |")
            continue
        lines.append(f"| {row['size']} px | {s['seconds']:.1f} | {o['seconds']:.1f} | {s['seconds'] / o['seconds']:.2f} | "
                     f"{s['growth_mib']:.0f} MiB | {o['growth_mib']:.0f} MiB | {s['growth_mib'] / o['growth_mib']:.2f} | "
                     f"{row['max_abs_diff']:.1e} ({row['mean_abs_one_pass']:.3f}) |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "streaming.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
