"""``latent-upscale info``: the settings stored in an output, and the command that makes it again."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from typing import Any, Dict, List, Optional

from .common import BAD_INPUT, FAILED, OK, PROG, fail

EXAMPLES = f"""\
examples:
  {PROG} info big/photo_2x.png
  {PROG} info big/*.png --json | jq .settings.seed

Exit status: 0 every image has settings; 1 some have none (not written by {PROG}, or their
metadata was stripped); 2 some cannot be read.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} info", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Print the settings that an output of latent-upscale was made with "
                                            "(PNG text chunks; EXIF for JPEG and WebP).")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="images written by latent-upscale")
    p.add_argument("--json", action="store_true",
                   help='one JSON object a line: {"file": IMAGE, "settings": {...} or null}')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from ..metadata import read_settings

    args = build_parser().parse_args(argv)
    code = OK
    for i, path in enumerate(args.images):
        try:
            settings = read_settings(path)
        except OSError as e:
            code = max(code, fail(f"cannot read {path}: {e}", BAD_INPUT))
            continue
        if args.json:
            print(json.dumps({"file": path, "settings": settings}, ensure_ascii=False))
        elif settings is None:
            print(f"{path}: no latent-upscale settings in this file (it was not written by {PROG}, "
                  "or its metadata was stripped)")
        else:
            print(("\n" if i else "") + describe(path, settings))
        if settings is None:
            code = max(code, FAILED)
    return code


#: the order settings are shown in; others follow in the file's order, unset ones are left out
ORDER = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "sampler", "sigma_schedule",
         "eta", "tol_scale", "noise_level", "noise_aug_type", "faithful", "model", "revision", "variant",
         "random_weights", "dtype", "device", "input", "input_size", "version")


def describe(path: str, settings: Dict[str, Any]) -> str:
    """The settings as aligned lines, then the command that makes the image again."""
    lines = [f"{path}"]
    keys = [k for k in ORDER if k in settings] + [k for k in settings if k not in ORDER]
    keys = [k for k in keys if settings[k] is not None]
    width = max(map(len, keys), default=0) + 1
    for key in keys:
        lines.append(f"  {key + ':':<{width}} {json.dumps(settings[key], ensure_ascii=False)}")
    command = reproduce(settings, path)
    if command:
        lines.append(f"  to make it again: {command}")
    return "\n".join(lines)


def reproduce(settings: Dict[str, Any], output: str) -> Optional[str]:
    """A ``latent-upscale`` command that upscales the input again with the same settings."""
    from .upscale import OPTIONS, pipeline_defaults

    if "input" not in settings or "seed" not in settings:
        return None
    words = [PROG, settings["input"], "-o", os.path.basename(output)]
    for key, option in (("model", "--model"), ("revision", "--revision"), ("variant", "--variant")):
        if settings.get(key) is not None:
            words += [option, str(settings[key])]
    if settings.get("random_weights"):
        words.append("--random-weights")
    if settings.get("prompt"):
        words += ["--prompt", settings["prompt"]]
    words += ["--seed", str(settings["seed"])]
    defaults = pipeline_defaults()
    for name, option in OPTIONS.items():
        value = settings.get(name)
        always = name in ("num_inference_steps", "guidance_scale")
        if value is None or value is False or (value == defaults[name] and not always):
            continue
        words += [option] if value is True else [option, str(value)]
    for key in ("dtype", "device"):
        if settings.get(key):
            words += [f"--{key}", str(settings[key])]
    return shlex.join(words)
