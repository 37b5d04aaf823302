"""Our pipeline against diffusers' on identical tiny components (fp32, CPU): max |diff| ≤ 1e-5 on
the whole output (reference §8.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPT, floats_tensor, generator, max_diff
from hub_configs import HUB_SCHEDULER

TOL = 1e-5


def _inputs(**overrides):
    args = {"prompt": PROMPT, "image": floats_tensor((1, 4, 16, 16)), "num_inference_steps": 2, "output_type": "np"}
    args.update(overrides)
    return args


def _fresh(args):
    """A copy with its own generators, so both pipelines draw the same numbers."""
    out = dict(args)
    g = args.get("generator", 0)
    if isinstance(g, list):
        out["generator"] = [generator(s) for s in g]
    elif g is not None:
        out["generator"] = generator(g)
    return out


def run_both(theirs, ours, **overrides):
    args = _inputs(**overrides)
    expected = theirs(**_fresh(args)).images
    actual = ours(**_fresh(args)).images
    return expected, actual


def assert_same(expected, actual):
    if isinstance(expected, list):  # PIL
        assert len(expected) == len(actual)
        for e, a in zip(expected, actual):
            assert e.size == a.size and e.mode == a.mode
            assert max_diff(np.asarray(e), np.asarray(a)) <= 1  # uint8: at most a rounding step
            assert np.array_equal(np.asarray(e), np.asarray(a))
        return
    assert max_diff(expected, actual) <= TOL


@pytest.mark.parametrize(
    "case",
    [
        {},  # the default call: guidance 9 with "" as negative prompt
        {"negative_prompt": "french fries"},
        {"prompt": [PROMPT], "negative_prompt": ["french fries"]},
        {"guidance_scale": 0},
        {"guidance_scale": 1},
        {"guidance_scale": 4.5, "num_inference_steps": 1},
        {"num_inference_steps": 5},
        {"prompt": [PROMPT, "a cat"], "image": floats_tensor((2, 4, 16, 16)), "generator": [0, 1]},
        {"prompt": [PROMPT, "a cat"], "image": floats_tensor((2, 4, 12, 20)), "negative_prompt": ["x", "y"]},
    ],
    ids=["default", "negative-str", "negative-list", "guidance-0", "guidance-1", "1-step", "5-steps",
         "batch-2-generator-list", "batch-2-non-square"],
)
def test_call_matches_diffusers(tiny_diffusers_pipe, tiny_pipe, case):
    case = dict(case)
    if "generator" not in case:
        case["generator"] = 0
    expected, actual = run_both(tiny_diffusers_pipe, tiny_pipe, **case)
    assert expected.shape == actual.shape
    assert_same(expected, actual)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_every_output_type(tiny_diffusers_pipe, tiny_pipe, output_type):
    expected, actual = run_both(tiny_diffusers_pipe, tiny_pipe, output_type=output_type, generator=0)
    assert type(expected) is type(actual)
    assert_same(expected, actual)


@pytest.mark.parametrize("low", [0.0, -1.0], ids=["pixels-0-1", "pixels-minus1-1"])
def test_rgb_input_goes_through_the_vae(tiny_diffusers_pipe, tiny_pipe, low):
    image = floats_tensor((1, 3, 128, 128), seed=3) * (1 - low) + low
    expected, actual = run_both(tiny_diffusers_pipe, tiny_pipe, image=image, generator=0)
    assert actual.shape == (1, 256, 256, 3)
    assert_same(expected, actual)


def test_user_supplied_latents(tiny_diffusers_pipe, tiny_pipe):
    latents = torch.randn((1, 4, 32, 32), generator=generator(7))
    expected, actual = run_both(tiny_diffusers_pipe, tiny_pipe, latents=latents.clone(), generator=None)
    assert_same(expected, actual)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_hub_scheduler_config(tiny_diffusers_pipe, tiny_pipe, steps):
    from diffusers import EulerDiscreteScheduler as TheirScheduler

    from latent_upscaler.scheduler import EulerDiscreteScheduler

    theirs = type(tiny_diffusers_pipe)(**{**tiny_diffusers_pipe.components, "scheduler": TheirScheduler.from_config(HUB_SCHEDULER)})
    theirs.set_progress_bar_config(disable=True)
    ours = type(tiny_pipe)(**{**tiny_pipe.components, "scheduler": EulerDiscreteScheduler.from_config(HUB_SCHEDULER)})
    ours.set_progress_bar_config(disable=True)
    expected, actual = run_both(theirs, ours, num_inference_steps=steps, generator=0)
    assert_same(expected, actual)


def test_all_four_embeds_match_diffusers(tiny_diffusers_pipe, tiny_pipe):
    embeds, neg, pooled, neg_pooled = tiny_pipe.encode_prompt(PROMPT, torch.device("cpu"), True, "french fries")
    args = dict(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=neg_pooled, generator=0)
    expected, actual = run_both(tiny_diffusers_pipe, tiny_pipe, **args)
    assert_same(expected, actual)
    # and the embeds path equals the prompt path
    from_prompt = tiny_pipe(**_fresh(_inputs(negative_prompt="french fries", generator=0))).images
    assert_same(from_prompt, actual)


def test_prompt_embeds_without_negative_embeds_under_guidance(tiny_diffusers_pipe, tiny_pipe):
    """diffusers crashes here (UnboundLocalError); we encode the negative prompt ourselves."""
    embeds, _, pooled, _ = tiny_pipe.encode_prompt(PROMPT, torch.device("cpu"), False)
    actual = tiny_pipe(**_fresh(_inputs(prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                                        negative_prompt="french fries", generator=0))).images
    expected = tiny_diffusers_pipe(**_fresh(_inputs(negative_prompt="french fries", generator=0))).images
    assert_same(expected, actual)


def test_encode_prompt_matches_diffusers(tiny_diffusers_pipe, tiny_pipe):
    theirs = tiny_diffusers_pipe.encode_prompt([PROMPT, "a cat"], torch.device("cpu"), True, ["a", "b"])
    ours = tiny_pipe.encode_prompt([PROMPT, "a cat"], torch.device("cpu"), True, ["a", "b"])
    for e, a in zip(theirs, ours):
        assert max_diff(e, a) == 0.0


def test_callback_sees_what_diffusers_callback_sees(tiny_diffusers_pipe, tiny_pipe):
    seen = {"theirs": [], "ours": []}

    def recorder(key):
        return lambda step, t, latents: seen[key].append((step, float(t), latents.clone()))

    args = _inputs(num_inference_steps=5, generator=0, callback_steps=2)
    tiny_diffusers_pipe(**_fresh(args), callback=recorder("theirs"))
    tiny_pipe(**_fresh(args), callback=recorder("ours"))
    assert [s[:2] for s in seen["theirs"]] == [s[:2] for s in seen["ours"]] == [(0, 999.0), (2, 499.5), (4, 0.0)]
    for (_, _, e), (_, _, a) in zip(seen["theirs"], seen["ours"]):
        assert max_diff(e, a) <= TOL


def test_return_tuple(tiny_pipe):
    out = tiny_pipe(**_fresh(_inputs(generator=0)), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    full = tiny_pipe(**_fresh(_inputs(generator=0)))
    assert full.nsfw_content_detected is None
    assert max_diff(out[0], full.images) == 0.0 and max_diff(full[0], full["images"]) == 0.0
