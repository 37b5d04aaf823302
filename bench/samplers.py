"""Sampler accuracy against cost, on the full-size UNet with random weights (a benchmark, not a test).

Every deterministic sampler integrates the same probability-flow ODE from σ_max to σ_min (the
model's log-linear range) on one fixed conditioning; its final latent is compared with a 500-step
DPM++ 2M solution of that ODE, and plotted against the number of model evaluations (NFE). The
question it answers: which setting is at least as close to the ODE's solution as diffusers' default
(75-step Euler) for the fewest evaluations?

    .venv/bin/python bench/samplers.py [--latent 32] [--reference-steps 500] [--out bench/results]

Takes about 20 minutes on 2 CPU cores (each evaluation of the UNet at a 32×32 latent is ~1 s).
Guidance is off (one conditional pass per evaluation) to halve the cost; it does not change which
solver tracks the ODE best. Random weights are not the released model, so absolute errors say little;
the ranking of solvers is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from latent_upscaler import schedules
from latent_upscaler.conditioning import UpscalerConditioning, prepare_conditioning
from latent_upscaler.denoiser import KarrasDenoiser
from latent_upscaler.models.unet import KUNet, UNetConfig
from latent_upscaler.sampling import SAMPLERS
from latent_upscaler.scheduler import EulerDiscreteScheduler


class Counted:
    """The denoiser, counting its evaluations."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.model(x, sigma, **kw)


def to_sigma_min(name: str, n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n steps from σ_max to σ_min (no final step to 0, so every run solves the same ODE)."""
    if name == "log_linear":
        return schedules.log_linear(n, sigma_min, sigma_max)
    return schedules.SCHEDULES[name](n + 1, sigma_min, sigma_max)[:-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=32, help="UNet latent side (output image = 8× this)")
    p.add_argument("--reference-steps", type=int, default=500)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    unet = KUNet(UNetConfig()).eval()  # the hub architecture, random weights
    scheduler = EulerDiscreteScheduler()
    sigma_min, sigma_max = scheduler.sigma_min, scheduler.sigma_max
    g = torch.Generator().manual_seed(1)
    side = args.latent
    low_res = torch.randn(1, 4, side // 2, side // 2, generator=g)
    cond = prepare_conditioning(low_res, torch.zeros(1), torch.randn(1, 768, generator=g), None)
    cond["encoder_hidden_states"] = torch.randn(1, 77, 768, generator=g)
    denoiser = KarrasDenoiser(UpscalerConditioning(unet))
    x_T = torch.randn(1, 4, side, side, generator=g) * sigma_max

    def run(sampler: str, n: int, schedule: str = "log_linear", **options):
        model = Counted(denoiser)
        fn = SAMPLERS[sampler].function
        start = time.perf_counter()
        with torch.inference_mode():
            if sampler == "dpm_fast":
                x = fn(model, x_T.clone(), sigma_min, sigma_max, n, extra_args=cond, disable=True, **options)
            elif sampler == "dpm_adaptive":
                x = fn(model, x_T.clone(), sigma_min, sigma_max, extra_args=cond, disable=True, **options)
            else:
                x = fn(model, x_T.clone(), to_sigma_min(schedule, n, sigma_min, sigma_max), extra_args=cond,
                       disable=True, **options)
        return x, model.calls, time.perf_counter() - start

    print(f"reference: dpmpp_2m, {args.reference_steps} log-linear steps ...", flush=True)
    reference, ref_nfe, ref_seconds = run("dpmpp_2m", args.reference_steps)
    scale = reference.pow(2).mean().sqrt()

    candidates = [("euler", n, "log_linear", {}) for n in (10, 20, 40, 75)]
    candidates += [("heun", n, "log_linear", {}) for n in (4, 5, 6, 8)]
    candidates += [("dpm_2", n, "log_linear", {}) for n in (4, 5, 6, 8)]
    candidates += [("lms", n, "log_linear", {}) for n in (6, 8, 10, 12)]
    candidates += [("dpmpp_2m", n, s, {}) for s in ("log_linear", "karras", "exponential") for n in (6, 8, 10, 12)]
    candidates += [("dpm_fast", n, "-", {"eta": 0.0}) for n in (8, 10, 12)]
    candidates += [("dpm_adaptive", 0, "-", {"rtol": 0.05 * t, "atol": t / 127.5, "pcoeff": 0.2, "icoeff": 0.4,
                                             "dcoeff": 0.0, "eta": 0.0}) for t in (0.25, 1.0)]
    rows = []
    for sampler, n, schedule, options in candidates:
        x, nfe, seconds = run(sampler, n, schedule, **options)
        error = float((x - reference).pow(2).mean().sqrt() / scale)
        label = f"tol_scale {options['atol'] * 127.5:g}" if sampler == "dpm_adaptive" else f"{n} steps"
        rows.append({"sampler": sampler, "setting": label, "schedule": schedule, "nfe": nfe,
                     "relative_rms_error": error, "seconds": round(seconds, 1)})
        print(f"{sampler:>13} {label:>14} {schedule:>12}  NFE {nfe:4d}  error {error:.2e}  {seconds:6.1f} s", flush=True)

    baseline = next(r for r in rows if r["sampler"] == "euler" and r["setting"] == "75 steps")
    good = [r for r in rows if r["relative_rms_error"] <= baseline["relative_rms_error"]]
    cheapest = min(good, key=lambda r: (r["nfe"], r["relative_rms_error"]))
    os.makedirs(args.out, exist_ok=True)
    result = {"latent": side, "reference": {"sampler": "dpmpp_2m", "steps": args.reference_steps, "nfe": ref_nfe,
                                            "seconds": round(ref_seconds, 1)},
              "threads": args.threads, "torch": torch.__version__, "rows": rows, "baseline": baseline,
              "cheapest_at_least_as_close": cheapest}
    with open(os.path.join(args.out, "samplers.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "samplers.md"), "w") as f:
        f.write("| sampler | setting | schedule | NFE | relative RMS error vs 500-step reference |\n|---|---|---|---|---|\n")
        for r in sorted(rows, key=lambda r: (r["nfe"], r["relative_rms_error"])):
            f.write(f"| {r['sampler']} | {r['setting']} | {r['schedule']} | {r['nfe']} | {r['relative_rms_error']:.2e} |\n")
    print(f"\n75-step Euler: error {baseline['relative_rms_error']:.2e} with {baseline['nfe']} evaluations")
    print(f"cheapest at least as close: {cheapest['sampler']} {cheapest['setting']} ({cheapest['schedule']}), "
          f"{cheapest['nfe']} evaluations, error {cheapest['relative_rms_error']:.2e}")


if __name__ == "__main__":
    main()
