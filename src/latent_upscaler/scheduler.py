"""The noise schedule of the model, configured by diffusers' ``EulerDiscreteScheduler`` JSON.

The x2 latent upscaler is a continuous-σ model (Karras et al. 2022): the scheduler's only job is to
say which σ values a sampler visits. It keeps diffusers' config fields so that folders round-trip,
and is stateless: :meth:`EulerDiscreteScheduler.schedule` returns the σ list for a number of steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, Dict, List, NamedTuple, Optional

import numpy as np
import torch

from .configuration import ConfigError, ModelConfig

SCHEDULER_CONFIG_NAME = "scheduler_config.json"


@dataclasses.dataclass
class SchedulerConfig(ModelConfig):
    CLASS_NAME: ClassVar[str] = "EulerDiscreteScheduler"
    NEUTRAL: ClassVar[Dict[str, Any]] = {
        "use_karras_sigmas": False,  # other σ spacings are pipeline arguments here, not config
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "rescale_betas_zero_snr": False,
    }
    IGNORED: ClassVar[tuple] = ("clip_sample", "set_alpha_to_one", "skip_prk_steps")

    num_train_timesteps: int = 1000  # discrete training steps the σ table is defined on
    beta_start: float = 0.00085  # β of the first training step
    beta_end: float = 0.012  # β of the last training step
    beta_schedule: str = "scaled_linear"  # "scaled_linear" (SD) or "linear"
    trained_betas: Optional[List[float]] = None  # explicit β table, overrides the three above
    prediction_type: str = "original_sample"  # the UNet predicts the denoised latent (x0)
    interpolation_type: str = "log_linear"  # σ spacing: "log_linear" (the model's own) or "linear"
    timestep_spacing: str = "linspace"  # "linspace", "leading" or "trailing" (linear interpolation only)
    steps_offset: int = 0  # added to "leading" timesteps
    timestep_type: str = "discrete"  # kept for round-trips; no effect for x0 prediction
    sigma_min: Optional[float] = None  # kept for round-trips; only Karras/exponential spacings use it
    sigma_max: Optional[float] = None  # kept for round-trips; as sigma_min
    final_sigmas_type: str = "zero"  # value appended after the last σ; never reached by the sampler

    def validate(self, source: str = "config") -> None:
        if self.trained_betas is None and self.beta_schedule not in ("scaled_linear", "linear"):
            raise ConfigError(
                f"{source}: beta_schedule {self.beta_schedule!r} is not supported; "
                "use 'scaled_linear' (the model's own) or 'linear'"
            )
        if self.prediction_type not in ("original_sample", "sample"):
            raise ConfigError(
                f"{source}: prediction_type {self.prediction_type!r} is not supported; the x2 latent "
                "upscaler predicts the denoised latent ('original_sample')"
            )
        if self.interpolation_type not in ("log_linear", "linear"):
            raise ConfigError(
                f"{source}: interpolation_type {self.interpolation_type!r} is not supported; "
                "use 'log_linear' (the model's own) or 'linear'"
            )
        if self.timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ConfigError(
                f"{source}: timestep_spacing {self.timestep_spacing!r} is not supported; "
                "use 'linspace', 'leading' or 'trailing'"
            )
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ConfigError(f"{source}: final_sigmas_type {self.final_sigmas_type!r}; use 'zero' or 'sigma_min'")


class Schedule(NamedTuple):
    """The σ values of one sampling run.

    ``sigmas``: float32, from σ_max down; a run of N steps visits ``sigmas[: N + 1]``.
    ``timesteps``: float32, the discrete training step of each of the N steps (what diffusers hands
    its legacy ``callback``). ``init_noise_sigma``: the scale of the initial noise.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_sigma: torch.Tensor


class EulerDiscreteScheduler:
    """σ schedules of the model, read from and written as diffusers' ``EulerDiscreteScheduler`` config."""

    order = 1

    def __init__(self, config: Optional[SchedulerConfig] = None, **fields: Any):
        if config is None:
            config = SchedulerConfig.from_dict(fields, source="EulerDiscreteScheduler arguments")
        elif fields:
            raise TypeError("pass either a SchedulerConfig or keyword fields, not both")
        self.config = config
        # σ of each discrete training step: sqrt((1 - ᾱ_t) / ᾱ_t), float32 as the model was trained
        alphas_cumprod = torch.cumprod(1.0 - self._betas(), dim=0)
        self.training_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5

    def _betas(self) -> torch.Tensor:
        c = self.config
        if c.trained_betas is not None:
            return torch.tensor(c.trained_betas, dtype=torch.float32)
        if c.beta_schedule == "linear":
            return torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float32)
        return torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps, dtype=torch.float32) ** 2

    @property
    def sigma_min(self) -> float:
        return float(self.training_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.training_sigmas[-1])

    def _timesteps(self, num_steps: int) -> np.ndarray:
        c = self.config
        n_train = c.num_train_timesteps
        if c.timestep_spacing == "linspace":
            return np.linspace(0, n_train - 1, num_steps, dtype=np.float32)[::-1].copy()
        if c.timestep_spacing == "leading":
            ratio = n_train // num_steps
            return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.float32) + c.steps_offset
        ratio = n_train / num_steps
        return np.arange(n_train, 0, -ratio).round().astype(np.float32) - 1

    def schedule(self, num_inference_steps: int) -> Schedule:
        """The σ list for ``num_inference_steps`` steps, equal to diffusers' ``set_timesteps``."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        timesteps = self._timesteps(num_inference_steps)
        table = self.training_sigmas.numpy()
        if self.config.interpolation_type == "log_linear":
            # N + 1 values, log-uniform from σ_max to σ_min inclusive: the original notebook's schedule
            log_max, log_min = np.log(table[-1]), np.log(table[0])
            sigmas = torch.linspace(float(log_max), float(log_min), num_inference_steps + 1).exp().numpy()
        else:
            sigmas = np.interp(timesteps, np.arange(len(table)), table)
        final = table[0] if self.config.final_sigmas_type == "sigma_min" else 0.0
        sigmas = torch.from_numpy(np.concatenate([sigmas, [final]]).astype(np.float32))
        init = sigmas.max()
        if self.config.timestep_spacing == "leading":
            init = (init**2 + 1) ** 0.5
        return Schedule(sigmas, torch.from_numpy(timesteps.astype(np.float32)), init)

    # ---- diffusers-compatible construction and files ----

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> "EulerDiscreteScheduler":
        """From a dict, a SchedulerConfig, or any object with a ``config`` (e.g. diffusers' scheduler)."""
        if hasattr(config, "config") and not isinstance(config, SchedulerConfig):
            config = config.config
        raw = dataclasses.asdict(config) if isinstance(config, SchedulerConfig) else dict(config)
        raw.update(overrides)
        return cls(SchedulerConfig.from_dict(raw, source="scheduler config"))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, subfolder: Optional[str] = None) -> "EulerDiscreteScheduler":
        path = os.path.join(folder, subfolder or "", SCHEDULER_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {SCHEDULER_CONFIG_NAME} in {os.path.dirname(path)}")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if "interpolation_type" not in raw:
            # the hub's first upload (before revision f27ea45) lacked the field; diffusers then uses
            # "linear", which is not the schedule the model was trained for
            raise ConfigError(
                f"{path} has no 'interpolation_type' (an early revision of the hub folder); the model "
                "samples on 'log_linear' sigmas: add \"interpolation_type\": \"log_linear\" or use a newer revision"
            )
        return cls(SchedulerConfig.from_dict(raw, source=path))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        self.config.to_json_file(os.path.join(folder, SCHEDULER_CONFIG_NAME))

    def __repr__(self) -> str:
        return f"EulerDiscreteScheduler({self.config})"
