"""Our pipeline against diffusers' on a CUDA GPU: fp16 parity, timing, offloads, xformers (a check, not a test).

Issue #4 item 4: fp16 parity with diffusers, xformers, both CPU offloads, and the time of a 512 → 1024 px
upscale at 20 steps against diffusers, with the card's name. One process, sections in order of
importance; each section is guarded, so a failure is recorded (with the end of its traceback) and
the next section still runs. Results are rewritten after every section, so a run cut short keeps
what it had:

    card          GPU, driver, versions, matmul precision flags
    model         the hub architecture with random weights (seed 0), written once in the hub layout;
                  ours and diffusers' pipelines both load it with from_pretrained(torch_dtype=...)
    fp16_parity   256 → 512 px (latents 1×4×32×32), 20 steps, guidance 9, CPU generator seed 1:
                  ours vs diffusers, output_type "latent" and "np"; and with a generator on the device
    timing_fp16   512 → 1024 px (latents 1×4×64×64), 20 steps, guidance 9: one warm-up each, then
                  alternating timed calls; median seconds and peak CUDA memory of each
    offloads      ours with enable_model_cpu_offload() and enable_sequential_cpu_offload() (fresh
                  pipelines), diffusers' model offload; outputs against the plain fp16 run, time, peak
    xformers      enable_xformers_memory_efficient_attention() for ours and diffusers' against their
                  default attention; where xformers is missing or unusable, our error message
    fp32_parity   the parity case in float32 (the reference), and fp16 against fp32
    timing_fp32   as timing_fp16 in float32, as far as the time budget allows

Noise is drawn from a CPU generator (``torch.Generator().manual_seed(1)``): ours and diffusers' both
draw on the CPU and move the noise to the device (diffusers' ``randn_tensor``), so it does not depend on
the GPU. Peak memory is ``torch.cuda.max_memory_allocated`` reset before each call; ``weights_gib``
is the pipeline's own parameters and buffers on the GPU, ``peak_gib`` = weights + the call's peak above
what was allocated when it started (other pipelines may be resident meanwhile).

    python3 bench/gpu_check.py --out DIR                      # on the GPU machine (bench/gpu_check.sh)
    python bench/gpu_check.py --out DIR --quick --device cpu --model tiny   # smoke test on a CPU

``--quick`` shrinks everything (64 px inputs, 2 steps, no repeats); ``--model tiny`` uses diffusers'
tiny test components (tests/conftest.py) instead of the full-size architecture. Writes
``gpu_check.json`` and ``gpu_check.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROMPT = "a photo of an astronaut riding a horse"
GiB = 2**30
IMPLS = ("ours", "diffusers")
MODELS = {"full": "The hub model's full-size architecture", "tiny": "diffusers' tiny test components"}


# ------------------------------------------------------------------------------------------------
# settings and shared state


class Check:
    """The run's settings, the loaded pipelines, the reference outputs and the report."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.low = getattr(torch, args.low_dtype)  # float16 unless told otherwise
        quick = args.quick
        self.parity_side = 8 if quick else 32  # latent side: 64 or 256 px in, twice that out
        self.timing_side = 8 if quick else 64  # 64 or 512 px in → 1024 px out
        self.steps = 2 if quick else args.steps
        self.repeats = 1 if quick else args.repeats
        self.started = time.perf_counter()
        self.folder: Optional[str] = None
        self.pipes: Dict[tuple, Any] = {}  # (impl, dtype) → pipeline on the device
        self.refs: Dict[str, Any] = {}  # name → numpy output of a plain run
        self.report: Dict[str, Any] = {"settings": {
            "device": args.device, "quick": quick, "model": args.model, "low_dtype": args.low_dtype,
            "prompt": PROMPT, "guidance_scale": args.guidance, "steps": self.steps, "repeats": self.repeats,
            "parity_input_latents": [1, 4, self.parity_side, self.parity_side],
            "timing_input_latents": [1, 4, self.timing_side, self.timing_side],
            "generator": "torch.Generator('cpu').manual_seed(1) unless a section says otherwise",
            "budget_s": args.budget,
        }, "sections": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def save(self) -> None:
        os.makedirs(self.args.out, exist_ok=True)
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        path = os.path.join(self.args.out, "gpu_check.json")
        with open(path + ".tmp", "w") as f:
            json.dump(_clean(self.report), f, indent=1, allow_nan=False)
        os.replace(path + ".tmp", path)
        try:
            text = markdown(self.report)
        except Exception as e:  # noqa: BLE001 - the JSON above is what counts
            text = f"cannot summarise: {_error(e)}"
        with open(os.path.join(self.args.out, "gpu_check.md"), "w") as f:
            f.write(text)

    # ---- inputs ----

    def latents(self, side: int, dtype):
        import torch

        return torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)).to(dtype)

    # ---- pipelines ----

    def load(self, impl: str, dtype, to_device: bool = True):
        """A fresh pipeline from the model folder, progress bars off, on the device unless told not."""
        if impl == "ours":
            from latent_upscaler import StableDiffusionLatentUpscalePipeline
        else:
            from diffusers import StableDiffusionLatentUpscalePipeline
        pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(self.folder, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device) if to_device else pipe

    def pipe(self, impl: str, dtype):
        """The cached pipeline for (impl, dtype), loaded once and moved back to the device if parked."""
        key = (impl, dtype)
        if key not in self.pipes:
            self.pipes[key] = self.load(impl, dtype)
        pipe = self.pipes[key]
        if pipe.unet.device.type != self.device.type:
            pipe.to(self.device)
        return pipe

    def park(self) -> None:
        """Move every cached pipeline to the CPU, so that the next peak is a pipeline's own."""
        for pipe in self.pipes.values():
            pipe.to("cpu")
        self.free()

    def drop(self, dtype=None) -> None:
        """Forget cached pipelines (of ``dtype``, or all)."""
        for key in [k for k in self.pipes if dtype is None or k[1] == dtype]:
            del self.pipes[key]
        self.free()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    # ---- one call, timed ----

    def call(self, pipe, side: int, dtype, output_type: str = "np", generator=None, **extra) -> Dict[str, Any]:
        """One upscale of the seed-0 latents of ``side``; returns the output (numpy, float32), the
        seconds and the call's peak memory above what was allocated when it started."""
        import numpy as np
        import torch

        image = self.latents(side, dtype)
        generator = torch.Generator().manual_seed(1) if generator is None else generator
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = pipe(prompt=PROMPT, image=image, num_inference_steps=self.steps, guidance_scale=self.args.guidance,
                   generator=generator, output_type=output_type, **extra).images
        self.sync()
        seconds = time.perf_counter() - start
        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().numpy()
        result = {"out": np.asarray(out, dtype=np.float32), "seconds": seconds}
        if self.cuda:
            result["allocated_before_gib"] = before / GiB
            result["peak_above_start_gib"] = (torch.cuda.max_memory_allocated() - before) / GiB
            result["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
            result["allocated_after_gib"] = torch.cuda.memory_allocated() / GiB
        return result

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def weights_gib(pipe) -> float:
    """Bytes of the pipeline's parameters and buffers that sit on an accelerator (not CPU, not meta)."""
    total = 0
    for name in ("text_encoder", "unet", "vae"):
        model = getattr(pipe, name)
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type not in ("cpu", "meta"):
                total += t.numel() * t.element_size()
    return total / GiB


def diff(a, b) -> Dict[str, Any]:
    """max and mean |a − b| over entries finite in both, and how many are not finite in each."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return {"error": f"shapes differ: {a.shape} vs {b.shape}"}
    finite = np.isfinite(a) & np.isfinite(b)
    d = np.abs(a - b)[finite]
    return {"max": float(d.max()) if d.size else None, "mean": float(d.mean()) if d.size else None,
            "nonfinite_a": int((~np.isfinite(a)).sum()), "nonfinite_b": int((~np.isfinite(b)).sum())}


def summary_of(result: Dict[str, Any], weights: Optional[float] = None) -> Dict[str, Any]:
    """A call's numbers without its output; ``peak_gib`` as the pipeline's own weights + the call's peak."""
    keep = {k: v for k, v in result.items() if k != "out"}
    if weights is not None and "peak_above_start_gib" in keep:
        keep["weights_gib"] = weights
        keep["peak_gib"] = weights + keep["peak_above_start_gib"]
    return keep


# ------------------------------------------------------------------------------------------------
# sections


def section_card(c: Check, out: Dict[str, Any]) -> None:
    import torch

    out["python"] = platform.python_version()
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    for name in ("diffusers", "transformers", "huggingface_hub", "tokenizers", "accelerate", "safetensors",
                 "xformers", "numpy"):
        out[name] = _version(name)
    import latent_upscaler

    out["latent_upscaler"] = f"{latent_upscaler.__version__} from {os.path.dirname(latent_upscaler.__file__)}"
    out["git"] = _git()
    out["cpu_count"] = os.cpu_count()
    out["torch_threads"] = torch.get_num_threads()
    if c.cuda:
        props = torch.cuda.get_device_properties(c.device)
        out["gpu"] = torch.cuda.get_device_name(c.device)
        out["gpu_memory_gib"] = props.total_memory / GiB
        out["capability"] = f"{props.major}.{props.minor}"
        out["multiprocessors"] = props.multi_processor_count
        out["cudnn"] = torch.backends.cudnn.version()
        out["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        out["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        out["fp16_reduced_precision_reduction"] = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        out["sdpa_flash_and_mem_efficient_enabled"] = [torch.backends.cuda.flash_sdp_enabled(),
                                                       torch.backends.cuda.mem_efficient_sdp_enabled()]
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            out["nvidia_smi"] = f"unavailable: {e}"
    out["cudart12_for_xformers"] = c.report.get("cudart12")


def section_model(c: Check, out: Dict[str, Any]) -> None:
    """Write the model folder once: the hub architecture (or the tiny one) with random weights."""
    import torch

    folder = os.path.join(c.args.work, "model")
    start = time.perf_counter()
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        if c.args.model == "full":
            from latent_upscaler.random_weights import random_pipeline

            random_pipeline(seed=0).save_pretrained(folder)
        else:
            sys.path.insert(0, os.path.join(REPO, "tests"))
            from conftest import tiny_diffusers_components
            from diffusers import StableDiffusionLatentUpscalePipeline

            StableDiffusionLatentUpscalePipeline(**tiny_diffusers_components()).save_pretrained(folder)
    c.folder = folder
    out["folder"] = folder
    out["build_and_save_s"] = time.perf_counter() - start
    out["bytes_on_disk"] = sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                               if os.path.isfile(p))
    start = time.perf_counter()
    pipe = c.pipe("ours", c.low)
    out["load_ours_low_s"] = time.perf_counter() - start
    out["tokenizer"] = f"{type(pipe.tokenizer).__name__}, vocabulary {len(pipe.tokenizer)}"
    out["parameters_millions"] = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
                                  for name in ("text_encoder", "unet", "vae")}
    start = time.perf_counter()
    c.pipe("diffusers", c.low)
    out["load_diffusers_low_s"] = time.perf_counter() - start
    if c.cuda:
        out["allocated_after_loads_gib"] = torch.cuda.memory_allocated() / GiB


def section_parity(c: Check, out: Dict[str, Any], dtype) -> None:
    """Ours against diffusers at the parity size in ``dtype``, latents and pixels."""
    import torch

    tag = str(dtype).replace("torch.", "")
    outputs = {}
    for impl in IMPLS:
        pipe = c.pipe(impl, dtype)
        for output_type in ("latent", "np"):
            result = c.call(pipe, c.parity_side, dtype, output_type)
            outputs[(impl, output_type)] = result["out"]
            c.refs[f"{impl}-{tag}-{output_type}"] = result["out"]
            out[f"{impl}_{output_type}"] = summary_of(result, weights_gib(pipe))
    out["latents_ours_vs_diffusers"] = diff(outputs[("ours", "latent")], outputs[("diffusers", "latent")])
    out["images_ours_vs_diffusers"] = diff(outputs[("ours", "np")], outputs[("diffusers", "np")])
    out["latent_std"] = {impl: float(outputs[(impl, "latent")].std()) for impl in IMPLS}
    c.save()
    # the same with a generator on the device: both draw the noise there
    device_latents = {}
    for impl in IMPLS:
        generator = torch.Generator(c.device).manual_seed(1)
        device_latents[impl] = c.call(c.pipe(impl, dtype), c.parity_side, dtype, "latent", generator)["out"]
    out["device_generator_latents_ours_vs_diffusers"] = diff(device_latents["ours"], device_latents["diffusers"])
    # repeatability: a second identical call of ours
    again = c.call(c.pipe("ours", dtype), c.parity_side, dtype, "latent")["out"]
    out["ours_latents_repeat_vs_first"] = diff(again, outputs[("ours", "latent")])


def section_fp32_parity(c: Check, out: Dict[str, Any]) -> None:
    import torch

    c.drop(c.low)  # room, and fp32 peaks of their own
    section_parity(c, out, torch.float32)
    low = str(c.low).replace("torch.", "")
    for impl in IMPLS:
        for output_type in ("latent", "np"):
            key = f"{impl}-{low}-{output_type}"
            if key in c.refs:
                out[f"{impl}_{low}_vs_float32_{output_type}"] = diff(c.refs[key], c.refs[f"{impl}-float32-{output_type}"])


#: timed variants: ours at its defaults (max_memory "auto": VAE tiles above 512 px), diffusers, and
#: ours with max_memory=None (one pass, as diffusers)
TIMED = ("ours", "diffusers", "ours_untiled")


def _timed_call(c: Check, pipes, impl: str, dtype) -> Dict[str, Any]:
    extra = {"max_memory": None} if impl == "ours_untiled" else {}
    return c.call(pipes[impl], c.timing_side, dtype, **extra)


def section_timing(c: Check, out: Dict[str, Any], dtype) -> None:
    """One warm-up each, then alternating timed calls at the timing size; medians."""
    pipes = {impl: c.pipe(impl, dtype) for impl in IMPLS}
    pipes["ours_untiled"] = pipes["ours"]
    weights = {impl: weights_gib(pipes[impl]) for impl in TIMED}
    first = {}
    for impl in TIMED:
        result = _timed_call(c, pipes, impl, dtype)
        first[impl] = result["out"]
        out[f"{impl}_warmup"] = summary_of(result, weights[impl])
    out["images_ours_vs_diffusers"] = diff(first["ours"], first["diffusers"])
    out["images_ours_untiled_vs_diffusers"] = diff(first["ours_untiled"], first["diffusers"])
    out["output_shape"] = list(first["ours"].shape)
    c.save()
    per_pair = sum(out[f"{impl}_warmup"]["seconds"] for impl in TIMED)
    repeats = c.repeats
    if c.left() < per_pair * repeats:  # cut the repeats to the budget, one at least
        repeats = max(1, int(c.left() // max(per_pair, 1e-9)))
        out["repeats_cut_to_budget"] = repeats
    runs: Dict[str, List[Dict[str, Any]]] = {impl: [] for impl in TIMED}
    for r in range(repeats):
        for impl in (TIMED if r % 2 == 0 else TIMED[::-1]):
            runs[impl].append(summary_of(_timed_call(c, pipes, impl, dtype), weights[impl]))
        for impl in TIMED:
            out[impl] = _medians(runs[impl])
        for impl in ("ours", "ours_untiled"):
            out[f"time_ratio_{impl}_over_diffusers"] = out[impl]["seconds"] / out["diffusers"]["seconds"]
            if "peak_gib" in out[impl]:
                out[f"peak_ratio_{impl}_over_diffusers"] = out[impl]["peak_gib"] / out["diffusers"]["peak_gib"]
        c.save()


def _medians(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    medians = {k: statistics.median(r[k] for r in runs) for k in keys}
    medians["all_seconds"] = [r["seconds"] for r in runs]
    return medians


def section_offloads(c: Check, out: Dict[str, Any]) -> None:
    """Both of our offloads and diffusers' model offload, on fresh pipelines, against plain runs."""
    low = str(c.low).replace("torch.", "")
    for impl in IMPLS:  # the plain runs' reference outputs at this size
        if f"{impl}-{low}-np" not in c.refs:
            c.refs[f"{impl}-{low}-np"] = c.call(c.pipe(impl, c.low), c.parity_side, c.low)["out"]
    # a warm plain call of ours for the time and peak to compare with
    pipe = c.pipe("ours", c.low)
    out["ours_plain"] = summary_of(c.call(pipe, c.parity_side, c.low), weights_gib(pipe))
    c.park()
    kwargs = {} if c.cuda else {"device": c.device}  # the default execution device is the accelerator
    for impl, mode in (("ours", "model"), ("ours", "sequential"), ("diffusers", "model")):
        name = f"{impl}_{mode}"
        try:
            pipe = c.load(impl, c.low, to_device=False)
            getattr(pipe, f"enable_{mode}_cpu_offload")(**kwargs)
            result = c.call(pipe, c.parity_side, c.low)
            out[name] = summary_of(result)
            out[name]["vs_plain"] = diff(result["out"], c.refs[f"{impl}-{low}-np"])
            out[name]["execution_device"] = str(getattr(pipe, "_execution_device", None))
            if impl == "ours" and mode == "model":  # a second call through the same hooks
                again = c.call(pipe, c.parity_side, c.low)
                out[name]["second_call"] = {**summary_of(again), "vs_plain": diff(again["out"], result["out"])}
        except Exception as e:  # noqa: BLE001 - record and go on with the next offload
            out[name] = {"error": _error(e)}
        finally:
            pipe = None
            c.free()
        c.save()


def section_xformers(c: Check, out: Dict[str, Any]) -> None:
    """xformers' attention against each pipeline's default, or our error where it cannot run."""
    import importlib.util

    out["xformers_installed"] = importlib.util.find_spec("xformers") is not None
    out["xformers_version"] = _version("xformers")
    out["cudart12"] = c.report.get("cudart12")
    for impl in IMPLS:
        try:
            _xformers_one(c, out, impl)
        except Exception as e:  # noqa: BLE001 - record and go on with the other pipeline
            out[impl] = {**out.get(impl, {}), "error": _error(e)}
        c.save()


def _xformers_one(c: Check, out: Dict[str, Any], impl: str) -> None:
    low = str(c.low).replace("torch.", "")
    pipe = c.pipe(impl, c.low)
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as e:  # noqa: BLE001 - the error is the result
        tb = traceback.extract_tb(e.__traceback__)
        raised_in = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
        out[f"{impl}_enable"] = {
            "error_type": type(e).__name__, "message": str(e), "raised_in": raised_in,
            # clear: a user-facing error that names xformers, raised by our own code (not from deep inside)
            "clear": (isinstance(e, (ImportError, ValueError)) and "xformers" in str(e)
                      and (impl != "ours" or os.sep + "latent_upscaler" + os.sep in raised_in)),
        }
        return
    out[f"{impl}_enable"] = "ok"
    out[impl] = {}
    try:
        ref = c.refs.get(f"{impl}-{low}-np")
        if ref is None:
            raise RuntimeError("no plain run to compare with (the parity section failed?)")
        result = c.call(pipe, c.parity_side, c.low)
        out[impl].update(summary_of(result, weights_gib(pipe)))
        out[impl]["vs_default_attention"] = diff(result["out"], ref)
        c.save()
        timing = c.call(pipe, c.timing_side, c.low)  # the 1024 px case, warm
        out[impl]["timing_side_seconds"] = timing["seconds"]
        out[impl]["timing_side_peak_above_start_gib"] = timing.get("peak_above_start_gib")
    finally:
        pipe.disable_xformers_memory_efficient_attention()
    back = c.call(pipe, c.parity_side, c.low)
    out[impl]["after_disable_vs_default"] = diff(back["out"], ref)


# ------------------------------------------------------------------------------------------------
# xformers' PyPI wheel needs CUDA 12's runtime


def preload_cudart12() -> str:
    """xformers' PyPI wheel links ``libcudart.so.12`` while the machine's torch is built for CUDA 13.
    Load a CUDA 12 runtime (the system's, else the one carried in ``.whl/cu12``) before anything imports
    xformers, locally (RTLD_LOCAL), so that xformers' ``_C.so`` finds it by its soname; its symbols are
    versioned (``@libcudart.so.12``), so torch keeps its own runtime. Returns what was loaded."""
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        return "xformers not installed: nothing loaded"
    try:
        ctypes.CDLL("libcudart.so.12")
        return "libcudart.so.12 found on the system"
    except OSError:
        pass
    wheels = sorted(glob.glob(os.path.join(REPO, ".whl", "cu12", "nvidia_cuda_runtime_cu12-*.whl")))
    if not wheels:
        return "no libcudart.so.12 on the system and none carried in .whl/cu12"
    folder = tempfile.mkdtemp(prefix="cudart12-")
    with zipfile.ZipFile(wheels[-1]) as z:
        path = z.extract("nvidia/cuda_runtime/lib/libcudart.so.12", folder)
    ctypes.CDLL(path)
    return f"loaded {path} from {os.path.basename(wheels[-1])}"


# ------------------------------------------------------------------------------------------------
# report


def markdown(report: Dict[str, Any]) -> str:
    """The results as short lines and tables for the README; missing parts are left out."""
    s, settings = report["sections"], report["settings"]
    card = s.get("card", {})

    def get(d, *keys):
        for key in keys:
            d = d.get(key) if isinstance(d, dict) else None
        return d

    def fmt(x, spec=".3g"):
        return "–" if not isinstance(x, (int, float)) else format(x, spec)

    lines = [f"Card: {card.get('gpu', '?')} ({card.get('nvidia_smi', '')}); torch {card.get('torch')} (CUDA "
             f"{card.get('torch_cuda')}), diffusers {card.get('diffusers')}, transformers {card.get('transformers')}, "
             f"xformers {card.get('xformers')}; tree {card.get('git')}. {MODELS[settings['model']]}, random weights; "
             f"prompt {PROMPT!r}, guidance {settings['guidance_scale']}, {settings['steps']} steps.", ""]
    for name in ("timing_fp16", "timing_fp32"):
        t = s.get(name, {})
        if get(t, "ours", "seconds") is None or get(t, "diffusers", "seconds") is None:
            continue
        lines += [f"{name}: latents {settings['timing_input_latents']} in, output {t.get('output_shape')}, median of "
                  f"{len(t['ours']['all_seconds'])} alternating calls after a warm-up each", "",
                  "| | ours (default) | ours (max_memory=None) | diffusers | ours / diffusers | untiled / diffusers |",
                  "|---|---|---|---|---|---|",
                  f"| seconds | {fmt(get(t, 'ours', 'seconds'), '.2f')} | {fmt(get(t, 'ours_untiled', 'seconds'), '.2f')} | "
                  f"{fmt(get(t, 'diffusers', 'seconds'), '.2f')} | "
                  f"{fmt(t.get('time_ratio_ours_over_diffusers'), '.2f')} | "
                  f"{fmt(t.get('time_ratio_ours_untiled_over_diffusers'), '.2f')} |",
                  f"| peak GiB | {fmt(get(t, 'ours', 'peak_gib'), '.2f')} | {fmt(get(t, 'ours_untiled', 'peak_gib'), '.2f')} | "
                  f"{fmt(get(t, 'diffusers', 'peak_gib'), '.2f')} | "
                  f"{fmt(t.get('peak_ratio_ours_over_diffusers'), '.2f')} | "
                  f"{fmt(t.get('peak_ratio_ours_untiled_over_diffusers'), '.2f')} |", "",
                  f"max |Δ| of the images against diffusers': ours (default) "
                  f"{fmt(get(t, 'images_ours_vs_diffusers', 'max'))}, ours untiled "
                  f"{fmt(get(t, 'images_ours_untiled_vs_diffusers', 'max'))}", ""]
    for name in ("fp16_parity", "fp32_parity"):
        p = s.get(name, {})
        if "latents_ours_vs_diffusers" in p:
            lines.append(f"{name} (latents {settings['parity_input_latents']} in): ours vs diffusers max |Δ| latents "
                         f"{fmt(get(p, 'latents_ours_vs_diffusers', 'max'))}, images "
                         f"{fmt(get(p, 'images_ours_vs_diffusers', 'max'))} (mean {fmt(get(p, 'images_ours_vs_diffusers', 'mean'))}); "
                         f"generator on the device: latents {fmt(get(p, 'device_generator_latents_ours_vs_diffusers', 'max'))}")
    low = settings["low_dtype"]
    for impl in IMPLS:
        d = get(s, "fp32_parity", f"{impl}_{low}_vs_float32_np")
        if d:
            lines.append(f"{impl} {low} vs float32: max |Δ| images {fmt(d.get('max'))}, latents "
                         f"{fmt(get(s, 'fp32_parity', f'{impl}_{low}_vs_float32_latent', 'max'))}")
    o = s.get("offloads", {})
    if get(o, "ours_plain", "seconds") is not None:
        lines.append(f"plain ours ({low}, parity size): {fmt(o['ours_plain']['seconds'], '.2f')} s, peak "
                     f"{fmt(o['ours_plain'].get('peak_gib'), '.2f')} GiB")
    for name in ("ours_model", "ours_sequential", "diffusers_model"):
        r = o.get(name, {})
        if "seconds" in r:
            lines.append(f"offload {name}: {fmt(r['seconds'], '.2f')} s, peak {fmt(r.get('peak_gib'), '.2f')} GiB, "
                         f"max |Δ| vs plain {fmt(get(r, 'vs_plain', 'max'))}")
        elif "error" in r:
            lines.append(f"offload {name}: ERROR {r['error'].strip().splitlines()[-1]}")
    x = s.get("xformers", {})
    for impl in IMPLS:
        e = x.get(f"{impl}_enable")
        if isinstance(e, dict):
            lines.append(f"xformers {impl}: {e.get('error_type')}: {str(e.get('message'))[:300]} (clear: {e.get('clear')})")
        elif isinstance(x.get(impl), dict):
            r = x[impl]
            lines.append(f"xformers {impl}: max |Δ| vs default attention {fmt(get(r, 'vs_default_attention', 'max'))}, "
                         f"{fmt(r.get('timing_side_seconds'), '.2f')} s at the timing size"
                         + (f"; ERROR {r['error'].strip().splitlines()[-1]}" if "error" in r else ""))
    for name, sec in s.items():
        if isinstance(sec, dict) and ("error" in sec or "skipped" in sec):
            lines.append(f"{name}: {sec.get('skipped') or 'ERROR ' + sec['error'].strip().splitlines()[-1]}")
    return "\n".join(lines) + "\n"


def quiet_loading() -> None:
    """No progress bars while loading and saving (they would fill the log)."""
    import importlib

    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            importlib.import_module(module).disable_progress_bar()
        except Exception as e:  # noqa: BLE001 - cosmetic
            print(f"cannot silence {module}: {type(e).__name__}: {e}", flush=True)


def _version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git() -> Optional[str]:
    """The commit of the tree, with "+changes" when it differs from it; None without git or .git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + (" +changes" if changes else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _error(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]


def _clean(x):
    """JSON-safe: non-finite floats become None, tuples lists, other objects their str."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def run_section(c: Check, name: str, fn: Callable[[Check, Dict[str, Any]], None], min_left: float = 0.0) -> None:
    out: Dict[str, Any] = {}
    c.report["sections"][name] = out
    if c.left() < min_left:
        out["skipped"] = f"time budget: {c.left():.0f} s left of {c.args.budget:.0f} s"
    else:
        start = time.perf_counter()
        print(f"[{c.elapsed():6.1f} s] {name} ...", flush=True)
        try:
            fn(c, out)
        except Exception as e:  # noqa: BLE001 - every section is recorded, failed or not
            out["error"] = _error(e)
            print(out["error"], flush=True)
        except KeyboardInterrupt:  # the wrapper's time limit (SIGINT): keep what there is, then stop
            out["error"] = "interrupted: out of time"
            out["section_s"] = time.perf_counter() - start
            c.save()
            raise
        out["section_s"] = time.perf_counter() - start
    c.save()
    print(f"[{c.elapsed():6.1f} s] {name}: {_short(out)}", flush=True)


def _short(out: Dict[str, Any]) -> str:
    text = json.dumps(_clean({k: v for k, v in out.items() if k != "error"}), separators=(",", ":"))
    if "error" in out:
        text = f"ERROR {out['error'].strip().splitlines()[-1]} " + text
    return text if len(text) < 1500 else text[:1500] + " …"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="64 px inputs, 2 steps, no repeats: a smoke test")
    p.add_argument("--model", choices=("full", "tiny"), default="full", help="tiny: diffusers' test components")
    p.add_argument("--low-dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=9.0)
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each pipeline after the warm-up")
    p.add_argument("--budget", type=float, default=280.0,
                   help="seconds: no section starts after this, and timing repeats are cut to fit")
    p.add_argument("--work", default=None, help="folder for the model (default: a temporary folder)")
    args = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_check-")
    try:
        run_all(Check(args))
    finally:
        if own_work:
            shutil.rmtree(args.work, ignore_errors=True)


def run_all(c: Check) -> None:
    import torch

    args = c.args
    if c.cuda:
        torch.cuda.init()  # torch's own CUDA runtime first
        try:
            c.report["cudart12"] = preload_cudart12()
        except Exception as e:  # noqa: BLE001
            c.report["cudart12"] = f"failed: {type(e).__name__}: {e}"
    quiet_loading()
    low = c.low
    run_section(c, "card", section_card)
    run_section(c, "model", section_model)
    run_section(c, "fp16_parity", lambda c, out: section_parity(c, out, low))
    run_section(c, "timing_fp16", lambda c, out: section_timing(c, out, low))
    run_section(c, "offloads", section_offloads, min_left=20)
    run_section(c, "xformers", section_xformers, min_left=10)
    c.drop()
    run_section(c, "fp32_parity", section_fp32_parity, min_left=20)
    run_section(c, "timing_fp32", lambda c, out: section_timing(c, out, torch.float32), min_left=30)
    with open(os.path.join(args.out, "gpu_check.md")) as f:
        print("\n" + f.read(), flush=True)
    print(f"done in {c.elapsed():.0f} s; results in {os.path.join(args.out, 'gpu_check.json')}", flush=True)


if __name__ == "__main__":
    main()
