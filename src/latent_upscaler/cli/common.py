"""What the commands share: messages, exit codes, device and dtype choice."""

from __future__ import annotations

import sys

PROG = "latent-upscale"
#: exit codes: 0 all done; 1 the run could not start (model) or a write failed; 2 bad arguments or
#: inputs (missing, unreadable, existing outputs without --overwrite); 130 interrupted
OK, FAILED, BAD_INPUT = 0, 1, 2
DTYPES = ("auto", "float32", "float16", "bfloat16")


def fail(message: str, code: int = FAILED) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def pick_device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    from ..switches import default_accelerator

    return default_accelerator()


def pick_dtype(name: str, device):
    """float16 on CUDA for "auto", float32 elsewhere; else the named dtype."""
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def quiet_libraries() -> None:
    """No download or loading bars and no warnings from transformers and huggingface_hub."""
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
