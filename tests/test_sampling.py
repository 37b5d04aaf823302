"""Samplers and σ schedules, in three tiers: closed-form maths on a Gaussian data distribution,
parity with k-diffusion 0.1.1.post1 on the same denoisers, σ lists and noise, and the randomness
contract (per-element generators, the Brownian noise's law)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import max_diff

from latent_upscaler import schedules
from latent_upscaler.sampling import SAMPLERS, BrownianNoise, lms_coefficients

SIGMA_MIN, SIGMA_MAX = 0.029167532920837402, 14.614642143249512  # the notebook's
MU, S = 0.3, 0.6  # data distribution N(MU, S²)
PARITY = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one thread avoids OpenMP spin-waits on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def K():
    try:  # diffusers first: kdiffusion_ref's torchvision stand-in has no __spec__, which diffusers checks
        import diffusers  # noqa: F401
    except ImportError:
        pass
    from kdiffusion_ref import import_k_diffusion

    return import_k_diffusion().sampling


def gaussian_denoiser(x, sigma):
    """The exact denoiser of N(MU, S²) data: E[x_0 | x_0 + σ n = x] = MU + S²/(S² + σ²)(x − MU)."""
    sigma = torch.as_tensor(sigma).reshape(-1, *[1] * (x.ndim - 1))
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_ode(x_start, sigma_start, sigma):
    """The probability-flow ODE's solution for N(MU, S²) data: x − MU scales like sqrt(S² + σ²)."""
    return MU + (x_start - MU) * math.sqrt((S**2 + sigma**2) / (S**2 + sigma_start**2))


class TinyDenoiser(torch.nn.Module):
    """A random conv net with Karras preconditioning and a conditioning input, as ``extra_args``."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv_in = torch.nn.Conv2d(6, 16, 3, padding=1)
            self.conv_out = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x, sigma, cond):
        sigma = sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        c_in = (sigma**2 + 1) ** -0.5
        h = self.conv_in(torch.cat([x * c_in, cond, sigma.log() / 4], 1))
        out = self.conv_out(torch.nn.functional.gelu(h))
        return x / (sigma**2 + 1) + out * sigma * c_in


TINY = TinyDenoiser().eval()
COND = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
DENOISERS = {"gaussian": (gaussian_denoiser, None), "convnet": (TINY, {"cond": COND})}


def start(sigma_max, seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * sigma_max


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- closed form


@pytest.mark.parametrize("name, kwargs, tol", [
    ("euler", {}, 0.25), ("heun", {}, 0.03), ("dpm_2", {}, 0.015), ("lms", {}, 0.015), ("dpmpp_2m", {}, 0.03),
    ("euler_ancestral", {"eta": 0}, 0.25), ("dpm_2_ancestral", {"eta": 0}, 0.015),
    ("dpmpp_2s_ancestral", {"eta": 0}, 0.02), ("dpmpp_sde", {"eta": 0}, 0.02),
])
def test_deterministic_samplers_solve_the_gaussian_ode(name, kwargs, tol):
    """25 Karras steps to σ = 0 (|x − MU| reaches 2.4 here): first-order errors are near 0.16,
    second-order ones below 0.02."""
    sigmas = schedules.karras(25, SIGMA_MIN, SIGMA_MAX)
    x = start(SIGMA_MAX)
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas, disable=True, **kwargs)
    assert max_diff(out, exact_ode(x, SIGMA_MAX, 0.0)) < tol


@pytest.mark.parametrize("name, kwargs, tol", [
    ("dpm_fast", {"n": 30}, 5e-4), ("dpm_adaptive", {}, 0.15), ("dpm_adaptive", {"rtol": 1e-3, "atol": 1e-4}, 0.05),
])
def test_dpm_solver_solves_the_gaussian_ode(name, kwargs, tol):
    x = start(SIGMA_MAX)
    out = SAMPLERS[name](gaussian_denoiser, x, SIGMA_MIN, SIGMA_MAX, disable=True, **kwargs)
    assert max_diff(out, exact_ode(x, SIGMA_MAX, SIGMA_MIN)) < tol


@pytest.mark.parametrize("name, kwargs", [
    ("euler_ancestral", {"steps": 200}), ("dpm_2_ancestral", {}), ("dpmpp_2s_ancestral", {}), ("dpmpp_sde", {}),
    ("heun", {"s_churn": 10.0}), ("dpm_fast", {"eta": 1.0, "n": 60}), ("dpm_adaptive", {"eta": 1.0}),
])
def test_stochastic_samplers_draw_the_gaussian(name, kwargs):
    """From N(MU, S² + σ_max²) noise, a stochastic sampler returns N(MU, S²) samples (16384 of them).

    dpmpp_sde's std is off by 0.035 at 50 steps if its two noises per step are drawn independently.
    """
    x = MU + (S**2 + SIGMA_MAX**2) ** 0.5 * torch.randn(1, 1, 128, 128, generator=gen(0))
    if SAMPLERS[name].takes_sigmas:
        sigmas = schedules.karras(kwargs.pop("steps", 50), SIGMA_MIN, SIGMA_MAX)
        out = SAMPLERS[name](gaussian_denoiser, x, sigmas, disable=True, generator=gen(1), **kwargs)
    else:
        out = SAMPLERS[name](gaussian_denoiser, x, SIGMA_MIN, SIGMA_MAX, disable=True, generator=gen(1), **kwargs)
    assert abs(out.mean() - MU) < 0.02 and abs(out.std() - S) < 0.02


def test_lms_coefficients_are_adams_bashforth():
    h = -0.5
    sigmas = [3.0 + k * h for k in range(6)]  # equal steps: the classic Adams–Bashforth weights × h
    assert lms_coefficients(sigmas, 0, 1) == pytest.approx([h])
    assert lms_coefficients(sigmas, 3, 2) == pytest.approx([1.5 * h, -0.5 * h])
    assert lms_coefficients(sigmas, 4, 4) == pytest.approx([55 / 24 * h, -59 / 24 * h, 37 / 24 * h, -9 / 24 * h])
    with pytest.raises(ValueError, match="order 3"):
        lms_coefficients(sigmas, 1, 3)


def test_log_linear_is_the_models_schedule():
    sigmas = schedules.log_linear(20, SIGMA_MIN, SIGMA_MAX)
    assert sigmas.dtype == torch.float32 and len(sigmas) == 21
    assert torch.equal(sigmas, torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), 21).exp())
    assert sigmas[0].item() == pytest.approx(SIGMA_MAX) and sigmas[-1].item() == pytest.approx(SIGMA_MIN)
    assert set(schedules.SCHEDULES) == {"log_linear", "karras", "exponential"}


# ---------------------------------------------------------------- parity with k-diffusion

# id: (sampler, kwargs, noise): noise "seed" seeds k-diffusion's global RNG and our generator alike;
# "brownian"/"brownian_tree" pass one shared noise sampler (ours, or k-diffusion's torchsde one)
LIST_CASES = {
    "euler": ("euler", {}, None),
    "euler_ancestral": ("euler_ancestral", {"eta": 0.7, "s_noise": 1.1}, "seed"),
    "heun": ("heun", {}, None),
    "heun_churn": ("heun", {"s_churn": 2.0, "s_noise": 1.01}, "seed"),
    "dpm_2": ("dpm_2", {}, None),
    "dpm_2_churn": ("dpm_2", {"s_churn": 2.0, "s_noise": 0.99}, "seed"),
    "dpm_2_ancestral": ("dpm_2_ancestral", {"eta": 0.8, "s_noise": 1.05}, "seed"),
    "lms": ("lms", {}, None),
    "lms_order_3": ("lms", {"order": 3}, None),
    "dpmpp_2m": ("dpmpp_2m", {}, None),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {"eta": 0.6, "s_noise": 1.1}, "seed"),
    "dpmpp_sde": ("dpmpp_sde", {"eta": 0.9, "s_noise": 1.05, "r": 0.4}, "brownian"),
}


def _recorder():
    calls = []
    return calls, lambda info: calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in info.items()})


def _run_pair(K, name, args, kwargs, noise, x):
    """(ours, theirs, our callbacks, their callbacks) for the same arguments and noise."""
    theirs_fn, ours_fn = getattr(K, f"sample_{name}"), SAMPLERS[name]
    ours_kwargs, theirs_kwargs = dict(kwargs), dict(kwargs)
    if noise == "seed":
        ours_kwargs["generator"] = gen(123)
    elif noise == "brownian":
        ours_kwargs["noise_sampler"] = theirs_kwargs["noise_sampler"] = BrownianNoise(x, gen(7))
    elif noise == "brownian_tree":
        positive = args[2][args[2] > 0]
        tree = K.BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=7)
        ours_kwargs["noise_sampler"] = theirs_kwargs["noise_sampler"] = tree
    ours_calls, ours_cb = _recorder()
    theirs_calls, theirs_cb = _recorder()
    torch.manual_seed(123)
    theirs = theirs_fn(*args, callback=theirs_cb, disable=True, **theirs_kwargs)
    ours = ours_fn(*args, callback=ours_cb, disable=True, **ours_kwargs)
    return ours, theirs, ours_calls, theirs_calls


def _same_callbacks(ours, theirs):
    assert [c["i"] for c in ours] == [c["i"] for c in theirs]
    assert [set(c) for c in ours] == [set(c) for c in theirs]
    for a, b in zip(ours, theirs):
        assert float(a["sigma"]) == pytest.approx(float(b["sigma"]), rel=1e-6)
        assert max_diff(a["denoised"], b["denoised"]) <= PARITY


@pytest.mark.parametrize("schedule", ["log_linear", "karras", "exponential"])
@pytest.mark.parametrize("denoiser", list(DENOISERS))
@pytest.mark.parametrize("case", list(LIST_CASES))
def test_list_samplers_equal_k_diffusion(K, case, denoiser, schedule):
    name, kwargs, noise = LIST_CASES[case]
    model, extra_args = DENOISERS[denoiser]
    sigmas = schedules.SCHEDULES[schedule](8, SIGMA_MIN, SIGMA_MAX)
    x = start(SIGMA_MAX)
    ours, theirs, ours_calls, theirs_calls = _run_pair(K, name, (model, x, sigmas, extra_args), kwargs, noise, x)
    assert max_diff(ours, theirs) <= PARITY
    _same_callbacks(ours_calls, theirs_calls)
    assert not torch.equal(ours, x)


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde on σ round-trips through log σ
def test_dpmpp_sde_equals_k_diffusion_with_their_brownian_tree(K):
    sigmas = schedules.karras(8, SIGMA_MIN, SIGMA_MAX)
    x = start(SIGMA_MAX)
    ours, theirs, _, _ = _run_pair(K, "dpmpp_sde", (TINY, x, sigmas, {"cond": COND}), {}, "brownian_tree", x)
    assert max_diff(ours, theirs) <= PARITY


@pytest.mark.parametrize("denoiser", list(DENOISERS))
@pytest.mark.parametrize("kwargs", [{"n": 10}, {"n": 12}, {"n": 11, "eta": 0.6, "s_noise": 1.1}],
                         ids=["10", "12", "11-eta"])
def test_dpm_fast_equals_k_diffusion(K, denoiser, kwargs):
    model, extra_args = DENOISERS[denoiser]
    x = start(SIGMA_MAX)
    kwargs = dict(kwargs)
    n = kwargs.pop("n")
    noise = "seed" if kwargs.get("eta") else None
    ours, theirs, ours_calls, theirs_calls = _run_pair(
        K, "dpm_fast", (model, x, SIGMA_MIN, SIGMA_MAX, n, extra_args), kwargs, noise, x)
    assert max_diff(ours, theirs) <= PARITY
    _same_callbacks(ours_calls, theirs_calls)


ADAPTIVE = {
    "default": {},
    "order2": {"order": 2},
    "notebook": {"rtol": 0.05 * 0.25, "atol": 0.25 / 127.5, "pcoeff": 0.2, "icoeff": 0.4, "eta": 1.0},
    "eta": {"eta": 0.5, "s_noise": 1.1, "h_init": 0.1, "accept_safety": 0.9},
}


@pytest.mark.parametrize("denoiser", list(DENOISERS))
@pytest.mark.parametrize("case", list(ADAPTIVE))
def test_dpm_adaptive_equals_k_diffusion(K, denoiser, case):
    model, extra_args = DENOISERS[denoiser]
    kwargs = {**ADAPTIVE[case], "return_info": True}
    x = start(SIGMA_MAX)
    noise = "seed" if kwargs.get("eta") else None
    (ours, ours_info), (theirs, theirs_info), ours_calls, theirs_calls = _run_pair(
        K, "dpm_adaptive", (model, x, SIGMA_MIN, SIGMA_MAX, extra_args), kwargs, noise, x)
    assert ours_info == theirs_info and ours_info["n_accept"] > 3
    assert max_diff(ours, theirs) <= PARITY
    _same_callbacks(ours_calls, theirs_calls)
    assert [c["nfe"] for c in ours_calls] == [c["nfe"] for c in theirs_calls]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_coefficients_equal_scipy_quad(K, order):
    sigmas = schedules.karras(12, SIGMA_MIN, SIGMA_MAX)
    for sigma_list in (sigmas.double().numpy(), sigmas.numpy()):
        for i in range(order - 1, 12):
            ours = lms_coefficients(sigma_list, i, order)
            theirs = [K.linear_multistep_coeff(order, sigma_list, i, j) for j in range(order)]
            assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-6


@pytest.mark.parametrize("n", [1, 2, 25])
def test_schedules_equal_k_diffusion(K, n):
    assert torch.equal(schedules.karras(n, SIGMA_MIN, SIGMA_MAX), K.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX))
    assert torch.equal(schedules.karras(n, 0.1, 10.0, rho=3.0), K.get_sigmas_karras(n, 0.1, 10.0, rho=3.0))
    assert torch.equal(schedules.exponential(n, SIGMA_MIN, SIGMA_MAX),
                       K.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX))


# ---------------------------------------------------------------- registry and randomness


def test_registry_counts_model_evaluations():
    assert list(SAMPLERS) == ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
                              "dpm_adaptive", "dpmpp_2m", "dpmpp_2s_ancestral", "dpmpp_sde"]
    assert {name for name, s in SAMPLERS.items() if s.stochastic} == {
        "euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"}
    x = start(SIGMA_MAX, shape=(1, 1, 2, 2))
    for name, sampler in SAMPLERS.items():
        for schedule, ends_at_zero in (("log_linear", False), ("karras", True)):
            count = [0]

            def model(x, sigma):
                count[0] += 1
                return gaussian_denoiser(x, sigma)

            if sampler.takes_sigmas:
                sampler(model, x, schedules.SCHEDULES[schedule](7, SIGMA_MIN, SIGMA_MAX), disable=True)
            else:
                sampler(model, x, SIGMA_MIN, SIGMA_MAX, **({"n": 7} if name == "dpm_fast" else {}), disable=True)
            expected = sampler.model_evals(7, ends_at_zero)
            assert expected is None or count[0] == expected, (name, schedule)
    assert SAMPLERS["dpm_adaptive"].model_evals(7) is None


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_sde", "heun"])
def test_generator_list_gives_per_element_noise(name):
    kwargs = {"s_churn": 5.0} if name == "heun" else {}
    sigmas = schedules.karras(6, SIGMA_MIN, SIGMA_MAX)
    x = start(SIGMA_MAX, shape=(2, 4, 8, 8))
    pair = SAMPLERS[name](gaussian_denoiser, x, sigmas, disable=True, generator=[gen(1), gen(2)], **kwargs)
    alone = SAMPLERS[name](gaussian_denoiser, x[1:], sigmas, disable=True, generator=[gen(2)], **kwargs)
    assert torch.equal(pair[1:], alone)
    assert not torch.equal(pair[0], pair[1])
    again = SAMPLERS[name](gaussian_denoiser, x, sigmas, disable=True, generator=[gen(1), gen(2)], **kwargs)
    assert torch.equal(pair, again)


def test_brownian_noise_has_brownian_increments():
    x = torch.zeros(200_000)
    w = BrownianNoise(x, gen(0))
    wide = w(2.0, 0.1)  # drawn first: the points inside come from Brownian bridges
    a, b, c = w(2.0, 1.0), w(1.0, 0.5), w(0.5, 0.1)
    for z in (wide, a, b, c):
        assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    for u, v in ((a, b), (b, c), (a, c)):  # disjoint intervals: independent
        assert abs((u * v).mean()) < 0.01
    # overlapping intervals: corr(W(2) − W(1), W(2) − W(0.1)) = sqrt(1 / 1.9)
    assert abs((a * wide).mean() - (1 / 1.9) ** 0.5) < 0.01
    torch.testing.assert_close(wide * 1.9**0.5, a + b * 0.5**0.5 + c * 0.4**0.5)
    assert torch.equal(w(1.0, 0.5), b)  # queries are answered from the same path
    assert torch.equal(BrownianNoise(x, gen(0))(2.0, 0.1), wide)
