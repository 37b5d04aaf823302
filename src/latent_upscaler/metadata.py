"""The settings of an upscale, stored in the image it produced, so that any output can be made again.

PNG: text chunks, one per readable setting (``prompt``, ``seed``, ...) plus ``latent-upscaler``
holding every setting as JSON. JPEG and WebP: the same JSON in the EXIF ImageDescription tag
(ASCII-escaped, as EXIF wants), and ``Software`` in its tag.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from . import __version__

#: the text chunk (PNG) that holds every setting as JSON
KEY = "latent-upscaler"
SOFTWARE = f"latent-upscaler {__version__}"
#: settings also written as text chunks of their own, readable by any PNG tool
READABLE = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "sampler", "sigma_schedule",
            "model", "version")
_EXIF_DESCRIPTION, _EXIF_SOFTWARE = 0x010E, 0x0131


def save_args(settings: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Arguments of ``PIL.Image.save`` that store ``settings`` in the file format of ``path``."""
    ext = os.path.splitext(path)[1].lower()
    if ext in ("", ".png"):
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Software", SOFTWARE)
        for key in READABLE:
            if settings.get(key) is not None:
                info.add_text(key, str(settings[key]))
        info.add_text(KEY, json.dumps(settings, ensure_ascii=False))
        return {"pnginfo": info}
    from PIL import Image

    exif = Image.Exif()
    exif[_EXIF_SOFTWARE] = SOFTWARE
    exif[_EXIF_DESCRIPTION] = json.dumps(settings, ensure_ascii=True)
    return {"exif": exif.tobytes()}


def read_settings(path: str) -> Optional[Dict[str, Any]]:
    """The settings stored in the image at ``path``; None when it holds none (not written by
    latent-upscale, or its metadata was stripped). Raises OSError when it is not a readable image."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", None) or {})
        raw = text.get(KEY)
        if raw is None:
            description = image.getexif().get(_EXIF_DESCRIPTION)
            raw = description if isinstance(description, str) and description.startswith("{") else None
    if raw is not None:
        try:
            settings = json.loads(raw)
        except json.JSONDecodeError:
            settings = None
        if isinstance(settings, dict):
            return settings
    readable = {k: text[k] for k in READABLE if k in text}  # a file whose JSON chunk was removed
    return readable or None
