"""``latent-upscale``: argument parsing and file handling only; the work is the library's."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Optional

from . import __version__
from .loading.hub import DEFAULT_MODEL

EXAMPLES = f"""examples:
  latent-upscale photo.png -o photo_2x.png
  latent-upscale photo.png -o photo_2x.png --prompt "a castle on a hill" --steps 20 --guidance-scale 0
  latent-upscale photo.png -o photo_2x.png --model ./sd-x2-latent-upscaler --seed 7

The model is {DEFAULT_MODEL} from the Hugging Face Hub (downloaded once into its
cache), or a local folder in the same layout given with --model.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latent-upscale",
        description="Double the resolution of an image with the Stable Diffusion x2 latent upscaler.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="image file to upscale (PNG, JPEG, WebP, ...; any size)")
    p.add_argument("-o", "--output", required=True, help="where to write the result; the extension picks the format")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    p.add_argument("--prompt", default="", help="text describing the image (default: none)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--steps", type=int, default=75, help="sampling steps (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=9.0,
                   help="classifier-free guidance; 0 ignores the prompt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder (default: %(default)s)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="model precision; auto = float16 on CUDA, float32 elsewhere")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, ... (default: the best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _fail(message: str, code: int = 1) -> int:
    print(f"latent-upscale: error: {message}", file=sys.stderr)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        return _fail(f"{args.output} exists; pass --overwrite to replace it, or choose another -o", 2)
    if args.steps < 1:
        return _fail("--steps must be at least 1", 2)

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(args.input) as f:
            image = f.copy()
    except (OSError, UnidentifiedImageError) as e:
        return _fail(f"cannot read {args.input}: {e}", 2)

    import torch

    from .configuration import ConfigError
    from .loading.hub import ModelNotAvailableError
    from .models.base import WeightsMismatchError
    from .pipeline import StableDiffusionLatentUpscalePipeline

    try:
        device = _device(args.device)
        dtype = _dtype(args.dtype, device)
        pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(args.model, dtype=dtype).to(device)
    except (ModelNotAvailableError, FileNotFoundError, ConfigError, WeightsMismatchError, RuntimeError) as e:
        return _fail(f"cannot load the model {args.model!r}:\n{e}")
    pipe.set_progress_bar_config(disable=args.quiet, desc="upscaling")

    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    try:
        result = pipe(
            prompt=args.prompt, image=image, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt, generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
    except (ValueError, TypeError) as e:
        return _fail(str(e), 2)

    try:
        _save_atomically(result, args.output, args.overwrite)
    except FileExistsError:
        return _fail(f"{args.output} appeared while upscaling; it was left as it is (pass --overwrite to replace it)")
    if not args.quiet:
        print(f"{args.input} ({image.width}×{image.height}) → {args.output} ({result.width}×{result.height}), seed {seed}")
    return 0


def _save_atomically(image, path: str, overwrite: bool) -> None:
    """Write to a temporary file beside ``path`` and rename: no half-written image, ever."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ext = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(prefix=".latent-upscale-", suffix=ext, dir=folder)
    os.close(fd)
    try:
        fmt = None if os.path.splitext(path)[1] else "PNG"
        if image.mode == "RGBA" and ext.lower() in (".jpg", ".jpeg"):
            image = image.convert("RGB")
        image.save(tmp, format=fmt)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobber
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                if os.path.exists(path):
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
