"""DPM-Solver samplers (Lu et al. 2022a, 2022b), and the noise that every stochastic sampler draws.

DPM-Solver steps in t = λ = −log σ. For the variance-exploding probability-flow ODE
dx/dσ = (x − D(x; σ)) / σ the linear part integrates exactly, leaving an exponentially weighted
integral of the model output that is approximated by a Taylor expansion in t:

- DPM-Solver (Lu et al. 2022a) expands the noise prediction ε = (x − D) / σ, in single steps of
  order 1, 2 or 3 (``sample_dpm_fast``, ``sample_dpm_adaptive``);
- DPM-Solver++ (Lu et al. 2022b) expands the denoised estimate D, which is better behaved;
  its first-order step is DDIM: x_next = D + (σ_next / σ)(x − D).

Ancestral variants split each step into a deterministic step to σ_down and fresh noise of σ_up
(:func:`get_ancestral_step`). Noise comes from a ``noise_sampler(sigma, sigma_next)`` returning
standard normal noise shaped like x; without one, it is drawn from ``generator`` (a
``torch.Generator``, one per batch element, or ``None`` for torch's global RNG) through
:func:`latent_upscaler.randomness.randn`.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Callable, Dict, List, Tuple

import torch
from tqdm.auto import tqdm, trange

from .randomness import Generators, randn

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---- noise: ancestral steps and noise samplers (sampling.py uses these too) ----


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step σ_from → σ_to into a deterministic step to σ_down and fresh noise of std σ_up.

    σ_down² + σ_up² = σ_to². With ``eta = 1``, σ_up² = σ_to² (σ_from² − σ_to²) / σ_from² is the
    variance of the posterior q(x_to | x_from, x_0) of the variance-exploding forward
    process, so the step samples it (ancestral sampling; Ho et al. 2020, Song et al. 2021 "Score-based
    generative modeling through SDEs"). ``eta = 0`` is the deterministic DDIM step (Song, Meng and
    Ermon 2021); ``eta`` scales σ_up in between, capped at σ_to.
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def gaussian_noise(x: torch.Tensor, generator: Generators = None) -> NoiseSampler:
    """A noise sampler that draws independent standard normal noise shaped like ``x`` at each call."""

    def noise(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    return noise


class BrownianNoise:
    """Increments of one Brownian motion W(σ) shaped like ``x``, drawn from ``generator``.

    ``noise(σ, σ_next) = (W(σ_next) − W(σ)) / sqrt|σ_next − σ|`` is standard normal, and the noise of
    overlapping intervals is correlated as a Brownian motion's increments are, which SDE solvers that
    query a step and a part of it need (``sample_dpmpp_sde``). This is the law of k-diffusion's
    ``BrownianTreeNoiseSampler`` without torchsde. W is drawn where it is queried: beyond the points
    already drawn it extends the path by an independent Gaussian increment; between two of them it is
    drawn from the Brownian bridge joining them. The path is therefore reproducible from the generator
    for a given sequence of queries, and per batch element with a list of generators.
    """

    def __init__(self, x: torch.Tensor, generator: Generators = None):
        self.shape, self.device, self.dtype = x.shape, x.device, x.dtype
        self.generator = generator
        self.times: List[float] = []  # ascending
        self.values: List[torch.Tensor] = []  # W at self.times

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        return (self.at(b) - self.at(a)) / abs(b - a) ** 0.5

    def at(self, t: float) -> torch.Tensor:
        """W(t), drawing it if it is new."""
        times, values = self.times, self.values
        k = bisect.bisect_left(times, t)
        if k < len(times) and times[k] == t:
            return values[k]
        if not times:  # the first point anchors the path; only increments are ever used
            w = torch.zeros(self.shape, device=self.device, dtype=self.dtype)
        elif k == 0:
            w = values[0] + (times[0] - t) ** 0.5 * self._normal()
        elif k == len(times):
            w = values[-1] + (t - times[-1]) ** 0.5 * self._normal()
        else:  # Brownian bridge from (t_a, W_a) to (t_b, W_b)
            t_a, t_b = times[k - 1], times[k]
            mean = values[k - 1] + (t - t_a) / (t_b - t_a) * (values[k] - values[k - 1])
            w = mean + ((t - t_a) * (t_b - t) / (t_b - t_a)) ** 0.5 * self._normal()
        times.insert(k, t)
        values.insert(k, w)
        return w

    def _normal(self) -> torch.Tensor:
        return randn(self.shape, generator=self.generator, device=self.device, dtype=self.dtype)


# ---- DPM-Solver (Lu et al. 2022a): noise prediction, single steps of order 1–3 in t = −log σ ----


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _noise_prediction(model, extra_args: Dict[str, Any], on_eval: Callable[[], Any]):
    """ε(x, t) = (x − D(x; σ(t))) / σ(t), the quantity DPM-Solver's Taylor expansion is of."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = _sigma(t)
        denoised = model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)
        on_eval()
        return (x - denoised) / sigma

    return eps


def _dpm_solver_pair(eps_at, x, t, t_next, eps, order: int):
    """DPM-Solver steps of orders ``order − 1`` and ``order`` from t to t_next, sharing evaluations.

    Lu et al. (2022a), §3.3, with ``eps`` = ε(x, t) given: order 1 gives
    (None, DPM-Solver-1); order 2 (DPM-Solver-1, DPM-Solver-2 with r₁ = 1/2); order 3
    (DPM-Solver-2 with r₁ = 1/3, DPM-Solver-3 with r₁ = 1/3, r₂ = 2/3). Order k costs k − 1
    evaluations beyond ``eps``.
    """
    h = t_next - t
    sigma_next = _sigma(t_next)
    first_order = sigma_next * h.expm1() * eps
    if order == 1:
        return None, x - first_order
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = t + r1 * h
    u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
    d1 = eps_at(u1, s1) - eps
    x_2 = x - first_order - sigma_next / (2 * r1) * h.expm1() * d1
    if order == 2:
        return x - first_order, x_2
    r2 = 2 / 3
    s2 = t + r2 * h
    phi = (r2 * h).expm1()
    u2 = x - _sigma(s2) * phi * eps - _sigma(s2) * (r2 / r1) * (phi / (r2 * h) - 1) * d1
    d2 = eps_at(u2, s2) - eps
    x_3 = x - first_order - sigma_next / r2 * (h.expm1() / h - 1) * d2
    return x_2, x_3


def _ancestral_in_t(t, t_next, t_end, eta: float):
    """The ancestral split of a step t → t_next: the solver goes to t_down, noise of σ_up adds the rest."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_down = torch.minimum(t_end, _t(sigma_down))
    return t_down, (_sigma(t_next) ** 2 - _sigma(t_down) ** 2) ** 0.5


def _log_sigma_range(sigma_min: float, sigma_max: float, device) -> Tuple[torch.Tensor, torch.Tensor]:
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(
            f"sigma_min={sigma_min} and sigma_max={sigma_max}: DPM-Solver steps in log σ, so both must be > 0 "
            "(pass the schedule's smallest nonzero σ as sigma_min)"
        )
    return _t(torch.tensor(float(sigma_max), device=device)), _t(torch.tensor(float(sigma_min), device=device))


@torch.no_grad()
def sample_dpm_fast(
    model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None,
    eta=0.0, s_noise=1.0, noise_sampler=None, generator: Generators = None,
):
    """DPM-Solver-fast: exactly ``n`` model evaluations, steps evenly spaced in log σ.

    Lu et al. (2022a), §3.4: ⌊n/3⌋ + 1 steps of order 3, the last ones of order 2 and 1 (n
    divisible by 3) or of order n mod 3. ``eta > 0`` makes each step ancestral.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = gaussian_noise(x, generator) if noise_sampler is None else noise_sampler
    t_start, t_end = _log_sigma_range(sigma_min, sigma_max, x.device)
    if eta and not t_end > t_start:
        raise ValueError("eta must be 0 when sampling from sigma_min up to sigma_max")
    n_steps = n // 3 + 1
    orders = [3] * (n_steps - 2) + [2, 1] if n % 3 == 0 else [3] * (n_steps - 1) + [n % 3]
    ts = torch.linspace(float(t_start), float(t_end), n_steps + 1, device=x.device)
    with tqdm(total=n, disable=disable) as bar:
        eps_at = _noise_prediction(model, extra_args, bar.update)
        for i, order in enumerate(orders):
            t, t_next = ts[i], ts[i + 1]
            t_down, sigma_up = _ancestral_in_t(t, t_next, t_end, eta)
            eps = eps_at(x, t)
            if callback is not None:
                sigma = _sigma(t)
                callback({"x": x, "i": i, "t": t, "t_up": t, "denoised": x - sigma * eps,
                          "sigma": sigma, "sigma_hat": sigma})
            _, x = _dpm_solver_pair(eps_at, x, t, t_down, eps, order)
            if eta:
                x = x + sigma_up * s_noise * noise_sampler(_sigma(t), _sigma(t_next))
    return x


@torch.no_grad()
def sample_dpm_adaptive(
    model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
    rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
    eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False, generator: Generators = None,
):
    """DPM-Solver-12 (``order=2``) or DPM-Solver-23 (``order=3``) with adaptive step size.

    Lu et al. (2022a), §3.4: each step computes solutions of orders ``order − 1`` and
    ``order``; their difference, relative to max(atol, rtol · max(|x_low|, |x_prev|)), is the error
    estimate. Its RMS drives a PID step-size controller in t = −log σ (Söderlind 2003, with the
    arctan limiter of Söderlind and Wang 2006); a step is accepted when the proposed growth factor is
    at least ``accept_safety``. The number of steps follows from the tolerances, not from a budget.
    With ``return_info``, also returns {"steps", "nfe", "n_accept", "n_reject"}.
    """
    if order not in (2, 3):
        raise ValueError(f"order={order}; DPM-Solver adaptive pairs orders 1–2 (order=2) or 2–3 (order=3)")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = gaussian_noise(x, generator) if noise_sampler is None else noise_sampler
    t_start, t_end = _log_sigma_range(sigma_min, sigma_max, x.device)
    forward = bool(t_end > t_start)
    if eta and not forward:
        raise ValueError("eta must be 0 when sampling from sigma_min up to sigma_max")
    h = abs(h_init) if forward else -abs(h_init)
    atol, rtol = torch.tensor(atol, device=x.device), torch.tensor(rtol, device=x.device)
    # PID exponents for 1/error of this step and of the last two accepted steps; the error of an
    # ancestral step shrinks like h^1.5 rather than h^order
    k = 1.5 if eta else order
    b1, b2, b3 = (pcoeff + icoeff + dcoeff) / k, -(pcoeff + 2 * dcoeff) / k, dcoeff / k
    history = None  # 1/error of the last two accepted steps (of the first step until one is accepted)
    s, x_prev = t_start, x
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    with tqdm(disable=disable) as bar:
        eps_at = _noise_prediction(model, extra_args, bar.update)
        while (s < t_end - 1e-5) if forward else (s > t_end + 1e-5):
            t = torch.minimum(t_end, s + h) if forward else torch.maximum(t_end, s + h)
            t_down, sigma_up = _ancestral_in_t(s, t, t_end, eta)
            eps = eps_at(x, s)
            denoised = x - _sigma(s) * eps
            x_low, x_high = _dpm_solver_pair(eps_at, x, s, t_down, eps, order)
            scale = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5

            inv_error = 1 / (float(error) + 1e-8)
            history = (inv_error, inv_error) if history is None else history
            factor = inv_error**b1 * history[0] ** b2 * history[1] ** b3
            factor = 1 + math.atan(factor - 1)
            accept = factor >= accept_safety
            h *= factor
            if accept:
                history = (inv_error, history[0])
                x_prev = x_low
                x = x_high
                if eta:
                    x = x + sigma_up * s_noise * noise_sampler(_sigma(s), _sigma(t))
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            if callback is not None:
                sigma = _sigma(s)
                callback({"x": x, "i": info["steps"] - 1, "t": s, "t_up": s, "denoised": denoised,
                          "error": error, "h": h, **info, "sigma": sigma, "sigma_hat": sigma})
    return (x, info) if return_info else x


# ---- DPM-Solver++ (Lu et al. 2022b): denoised-estimate steps over a σ list ----


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, step_end=None):
    """DPM-Solver++(2M): second-order multistep, reusing the previous step's denoised estimate.

    Lu et al. (2022b), Algorithm 2: with h = log(σ_i / σ_{i+1}) and r = h_{i−1} / h,
    D' = (1 + 1/(2r)) D_i − 1/(2r) D_{i−1}, then x_{i+1} = D' + (σ_{i+1} / σ_i)(x_i − D'). The first
    step (no history) and the step to σ = 0 are first order (DDIM).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
        else:
            if old_denoised is not None:
                r = (sigmas[i - 1] / sigma).log() / (sigma / sigma_next).log()
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            else:
                denoised_d = denoised
            x = denoised_d + (sigma_next / sigma) * (x - denoised_d)
        old_denoised = denoised
        if step_end is not None:
            x = step_end(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
    noise_sampler=None, generator: Generators = None, step_end=None,
):
    """Ancestral sampling with DPM-Solver++(2S) steps.

    Each step goes from σ_i to σ_down by DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, r = 1/2:
    a DDIM half-step to the midpoint in log σ, then a DDIM step with the midpoint's denoised
    estimate), then adds noise of σ_up (:func:`get_ancestral_step`).
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
        if sigma_down == 0:  # an Euler step to σ = 0 lands on the denoised estimate
            x = denoised
        else:
            sigma_mid = (sigma * sigma_down).sqrt()
            x_mid = denoised + (sigma_mid / sigma) * (x - denoised)
            denoised_mid = model(x_mid, sigma_mid * s_in, **extra_args)
            x = denoised_mid + (sigma_down / sigma) * (x - denoised_mid)
        if sigma_next > 0 and eta:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
        if step_end is not None:
            x = step_end(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
    noise_sampler=None, r=1 / 2, generator: Generators = None, step_end=None,
):
    """DPM-Solver++ (stochastic): a two-stage DPM-Solver++ step with ancestral noise in both stages.

    k-diffusion's SDE variant of DPM-Solver++(2S) (Lu et al. 2022b): stage 1 takes an ancestral
    DDIM step from σ_i to σ_s = σ_i^(1−r) σ_{i+1}^r; stage 2 steps from σ_i to σ_{i+1} with
    D' = (1 − 1/(2r)) D_i + 1/(2r) D_s, again ancestrally. The two stages' noises are increments of
    one Brownian motion over [σ_s, σ_i] and [σ_{i+1}, σ_i], so they are correlated; without a
    ``noise_sampler`` they come from a :class:`BrownianNoise` drawn from ``generator``.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = BrownianNoise(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    fac = 1 / (2 * r)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:  # an Euler step to σ = 0 lands on the denoised estimate
            x = denoised
            if step_end is not None:
                x = step_end(i, x, denoised)
            continue
        t, t_next = _t(sigma), _t(sigma_next)
        s = t + r * (t_next - t)
        sigma_t, sigma_s, sigma_t_next = _sigma(t), _sigma(s), _sigma(t_next)  # σ as the noise queries see it
        # stage 1: ancestral DDIM step to σ_s
        sigma_down, sigma_up = get_ancestral_step(sigma_t, sigma_s, eta)
        x_s = denoised + (sigma_down / sigma_t) * (x - denoised)
        if eta:
            x_s = x_s + noise_sampler(sigma_t, sigma_s) * s_noise * sigma_up
        denoised_s = model(x_s, sigma_s * s_in, **extra_args)
        # stage 2: ancestral step to σ_{i+1} with the combined denoised estimate
        sigma_down, sigma_up = get_ancestral_step(sigma_t, sigma_t_next, eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_s
        x = denoised_d + (sigma_down / sigma_t) * (x - denoised_d)
        if eta:
            x = x + noise_sampler(sigma_t, sigma_t_next) * s_noise * sigma_up
        if step_end is not None:
            x = step_end(i, x, denoised)
    return x
