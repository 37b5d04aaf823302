"""Many images through the pipeline: planned, resumable, reproducible.

:func:`plan` turns input files into jobs: an output path per image (an existing one is skipped, so a
rerun resumes where a stopped run ended), a seed and a prompt per image, and the image's size, read
from its header (an unreadable image is marked failed here, before any model is loaded).
:func:`run` upscales the pending jobs, images of one size together in batches, and writes each result
atomically with its settings in its metadata.

Seeds: image ``i`` (its 0-based position among the inputs, in the order they were found; images
skipped or failed keep their position) is upscaled with its own ``torch.Generator`` seeded with
``seed + i``. Its result therefore does not depend on the batch it is in (within 1/255: batched
arithmetic rounds differently) nor on which other images were already done, and the seed stored in
the image reproduces it alone: ``latent-upscale IMAGE -o OUT --seed SEED``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import metadata
from .files import DEFAULT_QUALITY, InputFile, output_name, write_image

PENDING, DONE, SKIPPED, FAILED = "pending", "done", "skipped", "failed"
DEFAULT_NAME = "{stem}_2x.png"
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass
class Job:
    """One input image and what became of it."""

    index: int  # position among the inputs; the seed is the run's seed + index
    input: str
    output: str
    seed: int
    prompt: str
    size: Optional[Tuple[int, int]] = None  # (width, height) in pixels, upright
    alpha: bool = False  # the image has transparency (kept, resized ×2, in the output)
    status: str = PENDING  # pending, done, skipped (output exists), failed
    error: Optional[str] = None  # why it failed
    unreadable: bool = False  # it failed because the input could not be read
    seconds: Optional[float] = None  # its share of its batch's time

    def record(self) -> Dict[str, Any]:
        """The job as the JSON summary shows it."""
        record = {"input": self.input, "output": self.output, "seed": self.seed, "seconds": self.seconds,
                  "status": self.status}
        if self.error is not None:
            record["error"] = self.error
        return record


def plan(inputs: Sequence[InputFile], *, seed: int, prompts: Sequence[str], output_dir: Optional[str] = None,
         name: str = DEFAULT_NAME, output_file: Optional[str] = None, overwrite: bool = False) -> List[Job]:
    """A job per input: its output path, seed and prompt; its status.

    Outputs go to ``output_file`` (one input only) or to ``output_dir``/subfolder/``name``, where
    ``name`` may use {stem}, {index}, {seed} and {prompt}. ``prompts``: one for all images or one
    per image. Outputs that exist are ``skipped`` unless ``overwrite``; images whose header cannot
    be read are ``failed``. Raises ValueError when two inputs would write the same output, or an
    output would replace its own input.
    """
    if (output_file is None) == (output_dir is None):
        raise ValueError("give either an output file or an output folder")
    if output_file is not None and len(inputs) != 1:
        raise ValueError(f"an output file takes exactly one input image, got {len(inputs)}; "
                         "use an output folder for several")
    if len(prompts) not in (1, len(inputs)):
        raise ValueError(f"{len(prompts)} prompts for {len(inputs)} images; give one prompt per image "
                         "(in the order the images are listed) or one for all")
    jobs = []
    for index, item in enumerate(inputs):
        prompt = prompts[index if len(prompts) > 1 else 0]
        if output_file is not None:
            out = output_file
        else:
            stem = os.path.splitext(os.path.basename(item.path))[0]
            out = os.path.join(output_dir, item.subfolder,
                               output_name(name, stem=stem, index=index, seed=seed + index, prompt=prompt))
        jobs.append(Job(index, item.path, out, seed + index, prompt))
    _check_outputs(jobs)
    for job in jobs:
        if os.path.exists(job.output) and not overwrite:
            job.status = SKIPPED
        else:
            _probe(job)
    return jobs


def _check_outputs(jobs: List[Job]) -> None:
    by_output: Dict[str, Job] = {}
    inputs = {os.path.realpath(j.input) for j in jobs}
    for job in jobs:
        key = os.path.realpath(job.output)
        if key in inputs:
            raise ValueError(f"{job.input} would be written over an input ({job.output}); choose another "
                             "output folder or --name")
        if key in by_output:
            raise ValueError(f"{by_output[key].input} and {job.input} would both be written to {job.output}; "
                             "add {index} to --name, or choose an output folder per input")
        by_output[key] = job


def _probe(job: Job) -> None:
    """Read the image's size and whether it has alpha from its header; mark it failed if it cannot."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(job.input) as f:
            width, height = f.size
            if _orientation(f) in (5, 6, 7, 8):  # stored rotated by 90°
                width, height = height, width
            job.size = (width, height)
            job.alpha = f.mode in _ALPHA_MODES or (f.mode == "P" and "transparency" in f.info)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        _unreadable(job, e)


def _unreadable(job: Job, e: BaseException) -> None:
    job.status, job.error, job.unreadable = FAILED, f"cannot read {job.input}: {_reason(e)}", True


def _orientation(f) -> int:
    """The EXIF orientation, from the header: a PNG's eXIf chunk is read only if it comes before the
    pixels (PIL would decode the whole image to look after them; such files are rare)."""
    if f.format == "PNG" and "exif" not in f.info:
        return 1
    return f.getexif().get(_EXIF_ORIENTATION, 1)


def load_image(path: str):
    """The image upright (EXIF orientation applied), in a mode the pipeline takes as pixels."""
    from PIL import Image, ImageOps

    with Image.open(path) as f:
        image = ImageOps.exif_transpose(f)
        image.load()
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode not in ("RGB", "L") + _ALPHA_MODES:
        image = image.convert("RGB")
    return image


def batches(jobs: Sequence[Job], batch_size: int) -> Iterator[List[Job]]:
    """Jobs grouped by size and alpha (one pipeline call each), at most ``batch_size`` a group: each
    group as soon as it is full, then the others in the order of their first member."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    open_groups: Dict[Tuple, List[Job]] = {}
    for job in jobs:
        key = (job.size, job.alpha)
        group = open_groups.setdefault(key, [])
        group.append(job)
        if len(group) == batch_size:
            yield open_groups.pop(key)
    yield from open_groups.values()


def run(pipe, jobs: Sequence[Job], call_args: Dict[str, Any], *, batch_size: int = 1,
        context: Optional[Dict[str, Any]] = None, overwrite: bool = False, quality: int = DEFAULT_QUALITY,
        progress: bool = True, on_result: Optional[Callable[[Job], None]] = None) -> None:
    """Upscale the pending ``jobs`` with ``pipe(**call_args)`` and write their outputs.

    ``call_args``: the pipeline's keyword arguments shared by every image (steps, guidance,
    sampler, ...); each image adds its prompt and its generator. ``context``: what else goes into
    each output's metadata (model, dtype, ...). A failure marks the images it concerns and the run
    goes on, except a ValueError or TypeError of the pipeline (settings it refuses), which stops it;
    ``on_result`` is called with each job as soon as it is done or failed. Progress bars (images,
    and steps within a batch) go to standard error.
    """
    from tqdm.auto import tqdm

    pending = [j for j in jobs if j.status == PENDING]
    pipe.set_progress_bar_config(disable=not progress, desc="steps", leave=False, position=1)
    with tqdm(total=len(pending), desc="images", unit="image", disable=not progress, position=0) as bar:
        for group in batches(pending, batch_size):
            start = time.perf_counter()
            _upscale_group(pipe, group, call_args, context or {}, overwrite, quality)
            seconds = round((time.perf_counter() - start) / len(group), 3)
            for job in group:
                job.seconds = seconds
                bar.update()
                if on_result is not None:
                    on_result(job)


def _upscale_group(pipe, group: List[Job], call_args: Dict[str, Any], context: Dict[str, Any],
                   overwrite: bool, quality: int) -> None:
    """One pipeline call for images of one size; each job ends done or failed."""
    import torch

    loaded = []
    for job in group:
        try:
            loaded.append((job, load_image(job.input)))
        except Exception as e:  # corrupt past its header
            _unreadable(job, e)
    if not loaded:
        return
    try:
        results = pipe(
            prompt=[job.prompt for job, _ in loaded], image=[image for _, image in loaded],
            generator=[torch.Generator("cpu").manual_seed(job.seed) for job, _ in loaded], **call_args,
        ).images
    except (ValueError, TypeError):
        raise  # settings the pipeline refuses: every batch would fail the same way
    except Exception as e:  # e.g. out of memory: the run goes on with the next batch
        for job, _ in loaded:
            job.status, job.error = FAILED, f"upscaling failed: {_reason(e)}"
        return
    for (job, image), result in zip(loaded, results):
        settings = {**context, **call_args, "prompt": job.prompt, "seed": job.seed,
                    "input": os.path.basename(job.input), "input_size": list(image.size)}
        try:
            write_image(result, job.output, overwrite=overwrite, quality=quality,
                        save_args=metadata.save_args(settings, job.output))
            job.status = DONE
        except FileExistsError:
            job.status, job.error = FAILED, f"{job.output} appeared while upscaling; it was left as it is"
        except (OSError, ValueError) as e:
            job.status, job.error = FAILED, f"cannot write {job.output}: {_reason(e)}"


def counts(jobs: Sequence[Job]) -> Dict[str, int]:
    """How many jobs are done, skipped, failed (and still pending, after an interruption)."""
    result = {DONE: 0, SKIPPED: 0, FAILED: 0, PENDING: 0}
    for job in jobs:
        result[job.status] += 1
    return result


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
