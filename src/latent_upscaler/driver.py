"""Running a sampler for the pipeline: choosing it, passing the options it takes, and reporting each
step to the progress bar and the user's callbacks."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from . import sampling, schedules
from .conditioning import NOISE_AUG_TYPES

# the original notebook's σ range ("noise levels from stable diffusion", float64 values)
NOTEBOOK_SIGMA_MIN = 0.029167532920837402
NOTEBOOK_SIGMA_MAX = 14.614642143249512
# the notebook's controller for dpm_adaptive; rtol and atol follow from tol_scale
ADAPTIVE_OPTIONS = {"s_noise": 1.0, "pcoeff": 0.2, "icoeff": 0.4, "dcoeff": 0.0}
#: tensors a ``callback_on_step_end`` may ask for
CALLBACK_TENSOR_INPUTS = ("latents", "denoised", "prompt_embeds", "low_res_latents")


def get_sampler(name: str) -> Callable:
    fn = sampling.SAMPLERS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ValueError(f"sampler {name!r} is not one of {', '.join(sorted(sampling.SAMPLERS))}")
    return getattr(fn, "function", fn)


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def check_options(fn: Callable, name: str, sigma_schedule: str, eta: Optional[float], tol_scale: float,
                  noise_level: float, noise_aug_type: str, tensor_inputs: Sequence[str]) -> None:
    if sigma_schedule not in schedules.SCHEDULES:
        raise ValueError(f"sigma_schedule {sigma_schedule!r} is not one of {', '.join(schedules.SCHEDULES)}")
    if eta is not None:
        if not _accepts(fn, "eta"):
            raise ValueError(f"sampler {name!r} is deterministic and takes no eta; pick an ancestral or SDE "
                             "sampler (e.g. 'euler_ancestral') or leave eta unset")
        if not eta >= 0:
            raise ValueError(f"eta must be ≥ 0, got {eta!r}")
    if not tol_scale > 0:
        raise ValueError(f"tol_scale must be > 0, got {tol_scale!r}")
    if not (isinstance(noise_level, (int, float)) and noise_level >= 0):
        raise ValueError(f"noise_level must be a number ≥ 0, got {noise_level!r}")
    if noise_aug_type not in NOISE_AUG_TYPES:
        raise ValueError(f"noise_aug_type {noise_aug_type!r} is not one of {NOISE_AUG_TYPES}")
    unknown = set(tensor_inputs) - set(CALLBACK_TENSOR_INPUTS)
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not among {CALLBACK_TENSOR_INPUTS}")


def run_sampler(fn: Callable, model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Dict[str, Any],
                hooks: "StepHooks", *, generator, eta: Optional[float], tol_scale: float, steps: int,
                sigma_range: Optional[tuple] = None) -> torch.Tensor:
    """Call ``fn`` with the arguments its signature takes (k-diffusion's, plus ``generator`` and
    ``step_end``). The DPM-Solver samplers get ``sigma_range`` (σ_min, σ_max) instead of the σ list
    (by default the list's smallest positive and largest values)."""
    kwargs: Dict[str, Any] = {"extra_args": extra_args, "disable": True}
    if _accepts(fn, "generator"):
        kwargs["generator"] = generator
    if eta is not None:
        kwargs["eta"] = eta
    if _accepts(fn, "step_end"):
        kwargs["step_end"] = hooks.step_end
    else:
        kwargs["callback"] = hooks.kdiffusion_callback
    sigmas = sigmas.to(x.device)
    if sigma_range is None:
        positive = sigmas[sigmas > 0]
        sigma_range = (float(positive.min()), float(positive.max()))
    sigma_min, sigma_max = sigma_range
    name = fn.__name__.removeprefix("sample_")
    if name == "dpm_fast":
        x = fn(model, x, sigma_min, sigma_max, steps, **kwargs)
    elif name == "dpm_adaptive":
        x = fn(model, x, sigma_min, sigma_max, rtol=0.05 * tol_scale, atol=tol_scale / 127.5,
               **ADAPTIVE_OPTIONS, **kwargs)
    else:
        x = fn(model, x, sigmas, **kwargs)
    hooks.finish(x)
    return x


class StepHooks:
    """Progress bar, diffusers' legacy ``callback`` and ``callback_on_step_end`` around a sampler.

    Samplers that take ``step_end(i, x, denoised) -> x`` report after each step's update, and a
    ``callback_on_step_end`` may replace the state. Others report through k-diffusion's callback,
    which fires before a step's update: each step is then reported when the next one starts.
    """

    def __init__(self, pipe, bar_config: Dict[str, Any], sigmas: torch.Tensor, timesteps: torch.Tensor,
                 callback, callback_steps: int, on_step_end, tensor_inputs: Sequence[str], cond: Dict[str, Any]):
        self.pipe, self.bar_config = pipe, bar_config
        self.sigmas, self.timesteps = sigmas, timesteps
        self.user_callback, self.callback_steps = callback, callback_steps
        self.on_step_end, self.tensor_inputs, self.cond = on_step_end, tuple(tensor_inputs), cond
        self._pending: Optional[tuple] = None
        self.bar = None

    def __enter__(self) -> "StepHooks":
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(self.sigmas) - 1, **self.bar_config)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def _timestep(self, i: int) -> torch.Tensor:
        return self.timesteps[i] if i < len(self.timesteps) else self.sigmas[min(i, len(self.sigmas) - 1)]

    def step_end(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """Step ``i`` has moved the state to ``x``; returns the state to continue from."""
        self.bar.update()
        if self.user_callback is not None and i % self.callback_steps == 0:
            self.user_callback(i, self._timestep(i), x)
        if self.on_step_end is not None:
            available = {"latents": x, "denoised": denoised, "prompt_embeds": self.cond["encoder_hidden_states"],
                         "low_res_latents": self.cond["low_res_cond"]}
            kwargs = {name: available[name] for name in self.tensor_inputs}
            sigma = self.sigmas[min(i, len(self.sigmas) - 1)]
            returned = self.on_step_end(self.pipe, i, sigma, kwargs) or {}
            new = returned.get("latents")
            if new is not None:
                if new.shape != x.shape:
                    raise ValueError(f"callback_on_step_end returned latents of shape {tuple(new.shape)}; "
                                     f"expected {tuple(x.shape)}")
                x = new.to(device=x.device, dtype=x.dtype)
        return x

    def kdiffusion_callback(self, info: Dict[str, Any]) -> None:
        # fires before step i's update: x is the result of step i - 1
        if self._pending is not None:
            self._report(self._pending[0], info["x"], self._pending[1])
        self._pending = (info["i"], info["denoised"])

    def _report(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        new = self.step_end(i, x, denoised)
        if new is not x:
            raise ValueError("this sampler cannot continue from latents replaced by callback_on_step_end")

    def finish(self, x: torch.Tensor) -> None:
        if self._pending is not None:
            self._report(self._pending[0], x, self._pending[1])
            self._pending = None
