"""The files of a batch run: finding input images, naming outputs, writing them atomically.

Inputs are files, folders (their images; with ``recursive`` also those of subfolders), glob patterns
and ``-`` (a list of paths, one a line, on standard input). Outputs are written to a hidden temporary
file beside their final name and then renamed, so an interrupted run never leaves a half-written
image; a temporary file left by a killed run is removed by the next run in the same folder.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import string
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

#: files taken from folders and globs; a file named explicitly is always tried, whatever its name
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: output extension → PIL format
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
NAME_FIELDS = ("stem", "index", "seed", "prompt")
DEFAULT_QUALITY = 95  # JPEG and WebP quality when none is given
TEMP_PREFIX = ".latent-upscale-"
_PROMPT_CHARS = 60  # longest {prompt} in a file name


@dataclasses.dataclass
class InputFile:
    """An image to upscale: its path as found, and the subfolder (relative to the folder argument
    it was found under, "" otherwise) that its output keeps under the output folder."""

    path: str
    subfolder: str = ""


def find_inputs(arguments: Sequence[str], recursive: bool = False, stdin: Optional[TextIO] = None,
                exclude: Optional[str] = None) -> Tuple[List[InputFile], List[str]]:
    """The images that ``arguments`` name, in order, each once; and a message per argument that
    names none (missing file, empty folder, glob without match).

    Folders and globs give their image files sorted by path, hidden files left out, and none from
    inside the folder ``exclude`` (the output folder: outputs are not inputs of the next run). Lines
    read from ``stdin`` for ``-`` are literal paths (files or folders), never globs.
    """
    found: List[InputFile] = []
    problems: List[str] = []
    seen = set()
    excluded = os.path.join(os.path.realpath(exclude), "") if exclude is not None else None

    def add(item: InputFile, discovered: bool = False) -> bool:
        key = os.path.realpath(item.path)
        if discovered and excluded is not None and key.startswith(excluded):
            return False
        if key not in seen:
            seen.add(key)
            found.append(item)
        return True

    for argument in arguments:
        if argument == "-":
            if stdin is None:
                raise ValueError("'-' reads paths from standard input, which is not available here")
            literal = [line.strip() for line in stdin.read().splitlines() if line.strip()]
            if not literal:
                problems.append("standard input ('-') listed no paths")
            for path in literal:
                _add_path(path, recursive, add, problems, literal=True)
        else:
            _add_path(argument, recursive, add, problems, literal=False)
    return found, problems


def _add_path(path: str, recursive: bool, add, problems: List[str], literal: bool) -> None:
    if os.path.isdir(path):
        images = _folder_images(path, recursive)
        if not images:
            hint = "" if recursive else " (pass --recursive to include subfolders)"
            problems.append(f"{path}: no images in this folder{hint}")
        elif not [add(InputFile(image, _subfolder(image, path)), discovered=True) for image in images].count(True):
            problems.append(f"{path}: its images are all inside the output folder, which holds outputs, "
                            "not inputs; choose an output folder outside it")
    elif os.path.exists(path):
        add(InputFile(path))
    elif not literal and glob.has_magic(path):
        matches = sorted(p for p in glob.glob(path, recursive=recursive)
                         if os.path.isfile(p) and _is_image_name(p))
        if not matches:
            problems.append(f"{path}: no image matches this pattern")
        for match in matches:
            add(InputFile(match), discovered=True)
    else:
        problems.append(f"{path}: no such file or folder")


def _subfolder(image: str, folder: str) -> str:
    rel = os.path.relpath(os.path.dirname(image), folder)
    return "" if rel == os.curdir else rel


def _is_image_name(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _folder_images(folder: str, recursive: bool) -> List[str]:
    if not recursive:
        return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                      if _is_image_name(n) and os.path.isfile(os.path.join(folder, n)))
    images = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        images += [os.path.join(root, n) for n in names if _is_image_name(n)]
    return sorted(images)


# ---- output names ----

def check_name_pattern(pattern: str) -> str:
    """The output format's extension for ``pattern`` (".png" when it has none); raises ValueError
    for unknown fields or formats."""
    for _, field, _, _ in string.Formatter().parse(pattern):
        if field is not None and field not in NAME_FIELDS:
            shown = "{}" if field == "" else "{" + field + "}"
            raise ValueError(f"--name {pattern!r}: unknown field {shown}; use "
                             + ", ".join("{" + f + "}" for f in NAME_FIELDS))
    ext = os.path.splitext(os.path.basename(pattern))[1].lower()
    if not ext or "{" in ext or "}" in ext:
        return ".png"
    if ext not in OUTPUT_FORMATS:
        raise ValueError(f"--name {pattern!r}: cannot write {ext} files; end the name with "
                         + ", ".join(OUTPUT_FORMATS) + " (PNG when there is no extension)")
    return ext


def output_name(pattern: str, *, stem: str, index: int, seed: int, prompt: str) -> str:
    """``pattern`` with its fields filled in, the format's extension added when it has none."""
    ext = check_name_pattern(pattern)
    name = pattern.format(stem=stem, index=index, seed=seed, prompt=safe_for_file_name(prompt))
    if not os.path.splitext(os.path.basename(pattern))[1].lower() == ext:
        name += ext
    return name


def safe_for_file_name(text: str) -> str:
    """Letters, digits, '-' and '.' kept; any run of other characters becomes one '_';
    at most 60 characters; "prompt" for an empty prompt."""
    safe = re.sub(r"[^\w.-]+", "_", text, flags=re.UNICODE).strip("._")[:_PROMPT_CHARS].rstrip("._")
    return safe or "prompt"


# ---- atomic writes ----

def write_image(image, path: str, *, overwrite: bool = False, quality: int = DEFAULT_QUALITY,
                save_args: Optional[Dict[str, Any]] = None) -> None:
    """Save the PIL ``image`` to ``path`` in the format of its extension (PNG without one).

    Written to a hidden temporary file beside ``path``, flushed to disk, then renamed: there is
    never a half-written ``path``. Without ``overwrite`` an existing ``path`` is left as it is and
    FileExistsError raised, even when it appeared while this image was being written.
    ``save_args``: extra arguments of ``PIL.Image.save`` (metadata).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ext = os.path.splitext(path)[1].lower()
    fmt = OUTPUT_FORMATS.get(ext, "PNG" if not ext else None)
    if fmt is None:
        raise ValueError(f"cannot write {ext} files; use one of {', '.join(OUTPUT_FORMATS)}")
    if image.mode in ("RGBA", "LA") and fmt == "JPEG":
        image = image.convert("RGB")  # JPEG has no alpha
    kwargs = dict(save_args or {})
    if fmt in ("JPEG", "WEBP"):
        kwargs["quality"] = quality
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=ext or ".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **kwargs)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails if path exists, even if it appeared just now: never clobber
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            if os.path.exists(path):
                raise FileExistsError(path) from None
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folders: Iterable[str]) -> List[str]:
    """Delete temporary files that runs killed while writing left in ``folders``; those of running
    processes stay. Returns the paths removed."""
    removed = []
    pattern = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")
    for folder in set(folders):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            match = pattern.match(name)
            if match and not _process_alive(int(match.group(1))):
                path = os.path.join(folder, name)
                try:
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would interrupt it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its file
    return True


def write_folder(folder: str, write: Callable[[str], None], overwrite: bool = False) -> None:
    """Call ``write(path)`` on a fresh hidden folder beside ``folder``, then rename it to ``folder``:
    an interrupted write leaves no half-written folder. An existing non-empty ``folder`` raises
    FileExistsError unless ``overwrite``; it is then replaced as a whole."""
    folder = os.path.abspath(folder)
    if os.path.isfile(folder):
        raise FileExistsError(f"{folder} is a file, not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=parent)
    old = None
    try:
        write(tmp)
        if os.path.isdir(folder):
            old = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-old-", dir=parent)
            os.rmdir(old)
            os.rename(folder, old)
        os.rename(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if not os.path.exists(folder):  # put the previous folder back
                os.rename(old, folder)
            else:
                shutil.rmtree(old, ignore_errors=True)
