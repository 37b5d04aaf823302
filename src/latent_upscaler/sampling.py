"""Samplers as stateless functions over a σ list, with k-diffusion's signatures, and their registry.

``model(x, sigma, **extra_args)`` returns the denoised estimate (``sigma`` a 0-d tensor, or one σ
per batch element); ``sigmas`` runs from σ_max down; a run visits every σ in the list and returns x
at the last one. ``callback`` sees each step before its update, as in k-diffusion. Our extension
``step_end(i, x, denoised) -> x`` runs after step i's update and may replace the state (the
pipeline's ``callback_on_step_end``); the DPM-Solver samplers with their own step control have none.

Stochastic samplers draw their noise from ``noise_sampler(sigma, sigma_next)`` when given, else from
``generator`` (one ``torch.Generator``, one per batch element, or ``None`` for torch's global RNG).
This module holds the samplers of Karras et al. (2022) and their ancestral and multistep relatives;
``sampling_dpm`` holds DPM-Solver and DPM-Solver++ and the noise helpers. :data:`SAMPLERS` lists all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from numpy.polynomial import polynomial as P
from tqdm.auto import trange

from .randomness import Generators, randn
from .sampling_dpm import (
    BrownianNoise,
    gaussian_noise,
    get_ancestral_step,
    sample_dpm_adaptive,
    sample_dpm_fast,
    sample_dpmpp_2m,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
)

__all__ = [
    "SAMPLERS", "Sampler", "BrownianNoise", "gaussian_noise", "get_ancestral_step", "lms_coefficients", "to_d",
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_lms", "sample_dpm_fast", "sample_dpm_adaptive", "sample_dpmpp_2m", "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dσ = (x − D(x; σ)) / σ (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Dict[str, Any]] = None,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
    disable: Optional[bool] = None,
    step_end: Optional[Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    extra_args = {} if extra_args is None else extra_args
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma = sigmas[i]
        denoised = model(x, sigma, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        d = to_d(x, sigma, denoised)
        x = x + d * (sigmas[i + 1] - sigma)
        if step_end is not None:
            x = step_end(i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
    noise_sampler=None, generator: Generators = None, step_end=None,
):
    """Ancestral sampling with Euler steps: an Euler step of the ODE from σ_i down to σ_down, then
    fresh noise of σ_up (:func:`get_ancestral_step`; Song et al. 2021)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = gaussian_noise(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_next > 0 and eta:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
        if step_end is not None:
            x = step_end(i, x, denoised)
    return x


def _churn(x, sigma, n_steps, s_churn, s_tmin, s_tmax, s_noise, generator):
    """Karras et al. (2022), Algorithm 2, lines 4–6: raise the noise level from σ to σ̂ = (1 + γ)σ by
    adding fresh noise, γ = min(S_churn / N, √2 − 1) for σ in [S_tmin, S_tmax]. Returns (x̂, σ̂)."""
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * s_noise
    return x + noise * (sigma_hat**2 - sigma**2) ** 0.5, sigma_hat


@torch.no_grad()
def sample_heun(
    model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
    s_tmax=float("inf"), s_noise=1.0, generator: Generators = None, step_end=None,
):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2; deterministic with ``s_churn=0``).

    An Euler step, then the trapezoidal rule with the derivative at its end; the step to σ = 0 stays
    an Euler step, since the derivative is undefined there.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    n_steps = len(sigmas) - 1
    for i in trange(n_steps, disable=disable):
        x, sigma_hat = _churn(x, sigmas[i], n_steps, s_churn, s_tmin, s_tmax, s_noise, generator)
        sigma_next = sigmas[i + 1]
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigma_next - sigma_hat
        x_next = x + d * dt
        if sigma_next > 0:
            d_next = to_d(x_next, sigma_next, model(x_next, sigma_next * s_in, **extra_args))
            x_next = x + (d + d_next) / 2 * dt
        x = x_next
        if step_end is not None:
            x = step_end(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2(
    model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
    s_tmax=float("inf"), s_noise=1.0, generator: Generators = None, step_end=None,
):
    """A second-order midpoint method in log σ, DPM-Solver-2 (Lu et al. 2022a) in Karras et al.'s
    (2022) Algorithm 2 (deterministic with ``s_churn=0``).

    A half step to the geometric mean σ_mid of σ̂ and σ_{i+1}, then the full step with the derivative
    there; the step to σ = 0 stays an Euler step.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    n_steps = len(sigmas) - 1
    for i in trange(n_steps, disable=disable):
        x, sigma_hat = _churn(x, sigmas[i], n_steps, s_churn, s_tmin, s_tmax, s_noise, generator)
        sigma_next = sigmas[i + 1]
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x = _midpoint_step(model, x, sigma_hat, sigma_next, d, s_in, extra_args)
        if step_end is not None:
            x = step_end(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
    noise_sampler=None, generator: Generators = None, step_end=None,
):
    """Ancestral sampling with DPM-Solver-2 steps: the midpoint step of :func:`sample_dpm_2` from σ_i
    to σ_down, then fresh noise of σ_up (:func:`get_ancestral_step`).

    Unlike k-diffusion, noise is added whenever σ_{i+1} > 0, also when ``eta > 1`` sends σ_down to 0.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = gaussian_noise(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = _midpoint_step(model, x, sigma, sigma_down, to_d(x, sigma, denoised), s_in, extra_args)
        if sigma_next > 0 and eta:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
        if step_end is not None:
            x = step_end(i, x, denoised)
    return x


def _midpoint_step(model, x, sigma, sigma_next, d, s_in, extra_args):
    """x at σ_next by the midpoint rule in log σ, given d = dx/dσ at σ; Euler when σ_next = 0."""
    if sigma_next == 0:
        return x + d * (sigma_next - sigma)
    sigma_mid = (sigma * sigma_next).sqrt()
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = to_d(x_mid, sigma_mid, model(x_mid, sigma_mid * s_in, **extra_args))
    return x + d_mid * (sigma_next - sigma)


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> List[float]:
    """Weights c_j of the linear multistep step x_{i+1} = x_i + Σ_j c_j d_{i−j}, j < ``order``.

    c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ, with ℓ_j the Lagrange polynomial through σ_i, …, σ_{i−order+1}
    that is 1 at σ_{i−j}: the variable-step Adams–Bashforth method. The integral is exact (polynomial
    arithmetic in float64, about σ_i for conditioning).
    """
    if order - 1 > i:
        raise ValueError(f"order {order} needs {order} past derivatives; step {i} has {i + 1}")
    nodes = [float(sigmas[i - k]) - float(sigmas[i]) for k in range(order)]
    h = float(sigmas[i + 1]) - float(sigmas[i])
    coefficients = []
    for j in range(order):
        others = nodes[:j] + nodes[j + 1 :]
        basis = P.polyfromroots(others) / np.prod([nodes[j] - node for node in others])
        coefficients.append(float(P.polyval(h, P.polyint(basis))))
    return coefficients


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, step_end=None):
    """Linear multistep (Adams–Bashforth) sampling of order ``order`` in σ (Karras et al. 2022 list it
    among the ODE solvers; k-diffusion's ``sample_lms``); lower orders while history builds up."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigmas_list = sigmas.detach().cpu().double().tolist()
    ds: List[torch.Tensor] = []  # the last `order` derivatives, newest last
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        coefficients = lms_coefficients(sigmas_list, i, len(ds))
        x = x + sum(c * d for c, d in zip(coefficients, reversed(ds)))
        if step_end is not None:
            x = step_end(i, x, denoised)
    return x


# ---- registry ----


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler function and what a caller needs to know about it; calling it calls ``function``."""

    function: Callable[..., torch.Tensor]
    default_eta: Optional[float]  # None: no eta argument; > 0: stochastic by default
    evals_per_step: Optional[int]  # model evaluations per step; None: adaptive (set by tolerances)
    takes_sigmas: bool = True  # False: called as function(model, x, sigma_min, sigma_max, ...) (DPM-Solver)

    @property
    def stochastic(self) -> bool:
        """Whether it draws noise with its default arguments (any sampler with an eta does for eta > 0)."""
        return bool(self.default_eta)

    def model_evals(self, n: int, ends_at_zero: bool = False) -> Optional[int]:
        """Model evaluations for ``n`` steps (for dpm_fast, ``n`` is the budget; None for dpm_adaptive).

        ``ends_at_zero``: the σ list ends with 0 (Karras, exponential), where two-evaluation samplers
        take a one-evaluation final step. For ancestral samplers this assumes eta ≤ 1.
        """
        if self.evals_per_step is None:
            return None
        if not self.takes_sigmas:
            return n
        return self.evals_per_step * n - (self.evals_per_step - 1) * int(ends_at_zero)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.function(*args, **kwargs)


SAMPLERS: Dict[str, Sampler] = {
    "euler": Sampler(sample_euler, None, 1),
    "euler_ancestral": Sampler(sample_euler_ancestral, 1.0, 1),
    "heun": Sampler(sample_heun, None, 2),
    "dpm_2": Sampler(sample_dpm_2, None, 2),
    "dpm_2_ancestral": Sampler(sample_dpm_2_ancestral, 1.0, 2),
    "lms": Sampler(sample_lms, None, 1),
    "dpm_fast": Sampler(sample_dpm_fast, 0.0, 1, takes_sigmas=False),
    "dpm_adaptive": Sampler(sample_dpm_adaptive, 0.0, None, takes_sigmas=False),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, None, 1),
    "dpmpp_2s_ancestral": Sampler(sample_dpmpp_2s_ancestral, 1.0, 2),
    "dpmpp_sde": Sampler(sample_dpmpp_sde, 1.0, 2),
}
