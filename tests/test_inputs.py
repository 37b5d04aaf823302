"""Inputs diffusers mishandles or rejects: any size, RGBA, grayscale, numpy; and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPT, floats_tensor, generator, max_diff
from PIL import Image


def _run(pipe, image, **kw):
    kw.setdefault("num_inference_steps", 1)
    kw.setdefault("generator", generator(0))
    return pipe(prompt=PROMPT, image=image, **kw).images


def _photo(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data.squeeze(-1) if channels == 1 else data, mode=mode)


@pytest.mark.parametrize("width,height", [(100, 60), (520, 40), (33, 31), (64, 64)])
def test_any_pixel_size_gives_exactly_twice(tiny_pipe, width, height):
    out = _run(tiny_pipe, _photo(width, height))[0]
    assert out.size == (2 * width, 2 * height)
    array = _run(tiny_pipe, _photo(width, height), output_type="np")
    assert array.shape == (1, 2 * height, 2 * width, 3)


@pytest.mark.parametrize("h,w", [(5, 7), (10, 14), (3, 3), (8, 12)])
def test_any_latent_size_gives_exactly_twice(tiny_pipe, h, w):
    latents = floats_tensor((1, 4, h, w))
    assert _run(tiny_pipe, latents, output_type="latent").shape == (1, 4, 2 * h, 2 * w)
    assert _run(tiny_pipe, latents, output_type="pt").shape == (1, 3, 16 * h, 16 * w)


def test_padded_input_equals_the_crop_of_a_run_on_the_padded_input(tiny_pipe):
    """A 5×7 latent is padded to 8×8 (bottom and right); the output is the top-left 10×14 of the run
    on the padded latent with the same (padded) noise."""
    from latent_upscaler.images import pad_bottom_right

    small = floats_tensor((1, 4, 5, 7))
    noise = torch.randn((1, 4, 10, 14), generator=generator(3))
    out = _run(tiny_pipe, small, latents=noise, output_type="latent", generator=None)
    padded = _run(tiny_pipe, pad_bottom_right(small, 8, 8), latents=pad_bottom_right(noise, 16, 16),
                  output_type="latent", generator=None)
    assert out.shape == (1, 4, 10, 14)
    assert max_diff(out, padded[:, :, :10, :14]) == 0.0
    # pixels are the decode of exactly those latents
    pixels = _run(tiny_pipe, small, latents=noise, output_type="pt", generator=None)
    decoded = tiny_pipe.vae.decode(out / tiny_pipe.vae.config.scaling_factor).sample
    assert pixels.shape == (1, 3, 80, 112)
    assert max_diff(pixels, (decoded / 2 + 0.5).clamp(0, 1)) == 0.0


def test_rgba_keeps_its_alpha(tiny_pipe):
    image = _photo(40, 24, "RGBA")
    alpha = np.zeros((24, 40), np.uint8)
    alpha[:, 20:] = 255
    image.putalpha(Image.fromarray(alpha))
    out = _run(tiny_pipe, image)[0]
    assert out.mode == "RGBA" and out.size == (80, 48)
    out_alpha = np.asarray(out.getchannel("A"))
    assert out_alpha[:, :38].max() == 0 and out_alpha[:, 42:].min() == 255
    np_out = _run(tiny_pipe, image, output_type="np")
    assert np_out.shape == (1, 48, 80, 4)


def test_rgba_is_not_taken_for_latents(tiny_pipe):
    rgba, rgb = _photo(64, 64, "RGBA"), _photo(64, 64, "RGBA").convert("RGB")
    a = _run(tiny_pipe, rgba, output_type="np")[..., :3]
    b = _run(tiny_pipe, rgb, output_type="np")
    assert max_diff(a, b) == 0.0


def test_grayscale_pil_numpy_and_tensor(tiny_pipe):
    gray = _photo(64, 32, "L")
    expected = _run(tiny_pipe, gray.convert("RGB"), output_type="np")
    assert max_diff(_run(tiny_pipe, gray, output_type="np"), expected) == 0.0
    as_array = np.asarray(gray)
    assert max_diff(_run(tiny_pipe, as_array, output_type="np"), expected) == 0.0
    as_tensor = torch.from_numpy(as_array.astype(np.float32) / 255)[None, None]
    assert max_diff(_run(tiny_pipe, as_tensor, output_type="np"), expected) <= 1e-6


def test_numpy_uint8_and_float_are_the_same_pixels(tiny_pipe):
    image = _photo(64, 64)
    u8 = np.asarray(image)
    a = _run(tiny_pipe, u8, output_type="np")
    b = _run(tiny_pipe, u8.astype(np.float32) / 255, output_type="np")
    c = _run(tiny_pipe, image, output_type="np")
    assert max_diff(a, b) == 0.0 and max_diff(a, c) == 0.0


def test_one_prompt_for_a_batch_of_images(tiny_pipe):
    latents = floats_tensor((2, 4, 8, 8))
    out = tiny_pipe(prompt=PROMPT, image=latents, num_inference_steps=1, generator=[generator(0), generator(1)],
                    output_type="latent").images
    single = tiny_pipe(prompt=PROMPT, image=latents[1:], num_inference_steps=1, generator=generator(1),
                       output_type="latent").images
    assert out.shape == (2, 4, 16, 16)
    assert max_diff(out[1:], single) <= 1e-5  # a generator per image: the same result in any batch


def test_list_of_pil_images(tiny_pipe):
    images = [_photo(64, 32, seed=1), _photo(64, 32, seed=2)]
    out = tiny_pipe(prompt=[PROMPT, PROMPT], image=images, num_inference_steps=1, generator=generator(0)).images
    assert [o.size for o in out] == [(128, 64), (128, 64)]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"image": floats_tensor((1, 2, 16, 16))}, ValueError, "2 channels"),
        ({"image": floats_tensor((1, 4, 8, 8)) * float("nan")}, ValueError, "NaN"),
        ({"image": torch.full((1, 3, 64, 64), float("inf"))}, ValueError, "NaN or infinite"),
        ({"image": floats_tensor((3, 4, 8, 8)), "prompt": ["a", "b"]}, ValueError, "2 prompts for 3 images"),
        ({"negative_prompt": ["a", "b", "c"], "prompt": ["x", "y"], "image": floats_tensor((2, 4, 8, 8))},
         ValueError, "negative_prompt has 3"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"output_type": "jpeg"}, ValueError, "output_type"),
        ({"image": []}, ValueError, "empty"),
        ({"prompt": []}, ValueError, "empty"),
        ({"image": None}, ValueError, "image is required"),
        ({"image": "cat.png"}, TypeError, "str is not supported"),
        ({"prompt": 3}, TypeError, "prompt must be"),
        ({"callback_steps": 0}, ValueError, "callback_steps"),
        ({"generator": [generator(0), generator(1)]}, ValueError, "generators"),
        ({"latents": torch.zeros(1, 4, 8, 8)}, ValueError, "latents have shape"),
        ({"prompt_embeds": torch.zeros(1, 77, 32), "prompt": None}, ValueError, "pooled_prompt_embeds"),
        ({"image": [floats_tensor((4, 8, 8)), floats_tensor((4, 8, 12))]}, ValueError, "same size"),
        ({"image": np.zeros((8, 8, 2), np.uint8)}, ValueError, "2 channels"),
    ],
)
def test_bad_input_says_what_was_wrong(tiny_pipe, kwargs, error, match):
    args = {"prompt": PROMPT, "image": floats_tensor((1, 4, 8, 8)), "num_inference_steps": 1}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        tiny_pipe(**args)
