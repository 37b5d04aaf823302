"""Tiled against untiled at a 512 px output, full-size architecture with random weights (a benchmark,
not a test): the VAE decode in tiles (whole-image and per-tile GroupNorm statistics), the UNet in
tiles (MultiDiffusion), and the seam measure at the tile borders.

    .venv/bin/python bench/tiling_accuracy.py [--steps 4] [--out bench/results]        # 512 px, VAE and UNet
    .venv/bin/python bench/tiling_accuracy.py --latent 128 --vae-modes sampled tile --skip-unet   # 1024 px, VAE

VAE GroupNorm statistics: "sampled" (the default: measured over an evenly spread subset of the
tiles, all of them up to 3 per axis), "global" (exact, every tile), "tile" (each its own, as diffusers).

Latents: white noise (fine detail at every pixel) whose contrast and tone change across the image,
so that per-tile statistics differ from tile to tile as they do on real pictures.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from latent_upscaler import tiling
from latent_upscaler.conditioning import UpscalerConditioning, prepare_conditioning
from latent_upscaler.denoiser import KarrasDenoiser
from latent_upscaler.guidance import ClassifierFreeGuidance
from latent_upscaler.models.unet import KUNet, UNetConfig
from latent_upscaler.models.vae import AutoencoderKL, VAEConfig
from latent_upscaler.sampling import SAMPLERS
from latent_upscaler.scheduler import EulerDiscreteScheduler


def detail_latents(size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    waves = torch.sin(3 * yy)[None, None] * torch.tensor([1.0, -1, 0.5, 0])[None, :, None, None]
    return torch.randn(1, 4, size, size, generator=g) * (0.5 + 1.0 * (xx > 0.5)) + waves


def compare(tiled: torch.Tensor, whole: torch.Tensor, tiles, scale: int) -> dict:
    d = (tiled - whole).float()
    rows, cols = tiling.tile_borders(tiles, scale)
    biases = torch.stack([d[(..., *t.window(scale))].mean((0, 2, 3)) for t in tiles])
    return {"max": d.abs().max().item(), "mean": d.abs().mean().item(), "magnitude": whole.abs().mean().item(),
            "tone_spread": biases.std(0).mean().item(),
            "seam_tiled": tiling.seam_ratio(tiled, rows, cols), "seam_untiled": tiling.seam_ratio(whole, rows, cols)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=64, help="output latent side (512 px = 64)")
    p.add_argument("--vae-tile", type=int, default=32)
    p.add_argument("--vae-overlap", type=int, default=8)
    p.add_argument("--unet-tile", type=int, default=40)
    p.add_argument("--unet-overlap", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-modes", nargs="+", default=list(tiling.GROUP_NORM_MODES), choices=tiling.GROUP_NORM_MODES)
    p.add_argument("--skip-unet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.latent
    results = {"latent": n, "args": vars(args)}

    with torch.no_grad():
        torch.manual_seed(0)
        vae = AutoencoderKL(VAEConfig()).eval()
        z = detail_latents(n, 1) / vae.config.scaling_factor * 0.18  # unscaled latents of about unit size
        start = time.perf_counter()
        whole = vae.decode(z).sample
        results["vae_decode_untiled_seconds"] = time.perf_counter() - start
        tiles = tiling.plan_tiles(n, n, args.vae_tile, args.vae_overlap)
        results["vae_tiles"] = {"count": len(tiles), "side": tiles[0].y.size,
                                "statistics_from": len(tiling.spread_tiles(tiles))}
        for mode in args.vae_modes:
            vae.enable_tiling(args.vae_tile, args.vae_overlap, mode)
            start = time.perf_counter()
            out = vae.decode(z).sample
            results[f"vae_decode_{mode}"] = {**compare(out, whole, tiles, 8), "seconds": time.perf_counter() - start}
            print(mode, results[f"vae_decode_{mode}"], flush=True)
        del vae, whole, out
    name = f"tiling_accuracy_{n * 8}_vae.json" if args.skip_unet else f"tiling_accuracy_{n * 8}.json"
    if args.skip_unet:
        _save(results, args.out, name)
        return

    with torch.no_grad():
        unet = KUNet(UNetConfig()).eval()
        g = torch.Generator().manual_seed(2)
        low_res = detail_latents(n // 2, 3)
        cond = prepare_conditioning(torch.cat([low_res] * 2), torch.zeros(2), torch.randn(2, 768, generator=g), None)
        cond["encoder_hidden_states"] = torch.randn(2, 77, 768, generator=g)
        model = ClassifierFreeGuidance(KarrasDenoiser(UpscalerConditioning(unet)), 9.0)
        tiled = tiling.TiledDenoiser(model, args.unet_tile, args.unet_overlap)
        utiles = tiled.plan(n, n)[0]
        sigmas = EulerDiscreteScheduler().schedule(args.steps).sigmas[: args.steps + 1]
        x_T = torch.randn(1, 4, n, n, generator=g) * sigmas[0]
        for sigma in (sigmas[0], torch.tensor(1.0), sigmas[args.steps - 1]):
            x = x_T / sigmas[0] * sigma
            d_whole, d_tiled = model(x, sigma, **cond), tiled(x, sigma, **cond)
            results[f"unet_denoised_sigma_{float(sigma):.3g}"] = compare(d_tiled, d_whole, utiles, 1)
            print(float(sigma), results[f"unet_denoised_sigma_{float(sigma):.3g}"], flush=True)
        euler = SAMPLERS["euler"].function
        end_whole = euler(model, x_T.clone(), sigmas, extra_args=cond, disable=True)
        end_tiled = euler(tiled, x_T.clone(), sigmas, extra_args=cond, disable=True)
        results[f"unet_euler_{args.steps}_steps"] = compare(end_tiled, end_whole, utiles, 1)
        print("euler", results[f"unet_euler_{args.steps}_steps"], flush=True)

    _save(results, args.out, name)


def _save(results: dict, out: str, name: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
