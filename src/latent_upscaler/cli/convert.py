"""``latent-upscale convert``: the original k-diffusion checkpoint → a model folder in the hub layout."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from ..loading.hub import DEFAULT_MODEL
from .common import BAD_INPUT, DTYPES, OK, PROG, fail, pick_dtype, quiet_libraries

EXAMPLES = f"""\
examples:
  {PROG} convert laion_text_cond_latent_upscaler_2_1_00470000_slim.pth -o sd-x2-latent-upscaler-original
  {PROG} convert model.safetensors --config config.json --components ./sd-x2-latent-upscaler -o converted
  {PROG} photo.png -o photo_2x.png --model converted --noise-level 0.2

The checkpoint holds the UNet and the noise-level embedding (kept: --noise-level above 0 needs it);
the VAE, CLIP text encoder, tokenizer and scheduler come from --components. The folder loads in this
package and in diffusers (which ignores the embedding). Only tensors are read from the checkpoint
(safetensors, or torch.load with weights_only=True): no code in it runs.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} convert", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Write a model folder in the hub layout from the ORIGINAL k-diffusion "
                                            "checkpoint of the x2 latent upscaler (model_ema in a .pth, .ckpt or "
                                            ".safetensors file).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="the original checkpoint file")
    p.add_argument("-o", "--output", required=True, metavar="FOLDER", help="the folder to write (hub layout)")
    p.add_argument("--config", metavar="JSON",
                   help="the checkpoint's k-diffusion config (default: the released model's, shipped here)")
    p.add_argument("--components", default=DEFAULT_MODEL, metavar="FOLDER_OR_ID",
                   help="where the VAE, text encoder, tokenizer and scheduler come from (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights "
                                                                       "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace FOLDER if it exists and is not empty")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        return fail(f"{args.checkpoint}: no such file", BAD_INPUT)
    if args.config is not None and not os.path.isfile(args.config):
        return fail(f"--config {args.config}: no such file", BAD_INPUT)
    out = args.output
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not args.overwrite):
        return fail(f"{out} exists and is not an empty folder; pass --overwrite to replace it, or choose another -o",
                    BAD_INPUT)
    if args.quiet or not sys.stderr.isatty():
        quiet_libraries()

    import torch

    from ..configuration import ConfigError
    from ..files import write_folder
    from ..loading.hub import ModelNotAvailableError
    from ..models.base import WeightsMismatchError
    from ..pipeline import StableDiffusionLatentUpscalePipeline

    dtype = pick_dtype(args.dtype, torch.device("cpu"))
    try:
        pipe = StableDiffusionLatentUpscalePipeline.from_single_file(
            args.checkpoint, config=args.config, components_from=args.components, dtype=dtype)
    except (ModelNotAvailableError, OSError, ConfigError, WeightsMismatchError, ValueError, KeyError) as e:
        return fail(f"cannot convert {args.checkpoint}:\n{e}")
    try:
        write_folder(out, pipe.save_pretrained, overwrite=args.overwrite)
    except OSError as e:
        return fail(f"cannot write {out}: {e}")
    if not args.quiet:
        extra = "" if pipe.low_res_noise_embed is None else " and its noise-level embedding"
        print(f"{args.checkpoint} → {out}: the UNet{extra} from the checkpoint; VAE, text encoder, tokenizer and "
              f"scheduler from {args.components}")
    return OK
