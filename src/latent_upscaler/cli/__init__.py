"""``latent-upscale``: argument parsing and messages only; the work is the library's.

    latent-upscale [upscale] INPUT... (-o FILE | --output-dir DIR) [options]   (the default command)
    latent-upscale info IMAGE...
    latent-upscale convert CHECKPOINT -o FOLDER [--config JSON] [--components FOLDER_OR_ID]
"""

from __future__ import annotations

import sys
from typing import List, Optional

COMMANDS = ("upscale", "info", "convert")


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command; ``upscale`` when the first argument names no other (a file named like a
    command is upscaled with ``latent-upscale upscale info``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "upscale"
    if argv and argv[0] == command:
        argv = argv[1:]
    if command == "info":
        from .info import main as run
    elif command == "convert":
        from .convert import main as run
    else:
        from .upscale import main as run
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("latent-upscale: interrupted", file=sys.stderr)
        return 130
