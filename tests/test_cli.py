"""The ``latent-upscale`` command, run as a user runs it: a subprocess on a tiny model folder."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def _cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "latent_upscaler.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_upscales_a_file(tiny_folder, picture, tmp_path):
    out = tmp_path / "out" / "big.png"
    r = _cli(picture, "-o", out, "--model", tiny_folder, "--steps", "2", "--seed", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    with Image.open(out) as image:
        assert image.size == (112, 80)
    again = tmp_path / "again.png"
    r = _cli(picture, "-o", again, "--model", tiny_folder, "--steps", "2", "--seed", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == again.read_bytes()  # same seed, same bytes
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".latent-upscale-")]


def test_never_overwrites_without_asking(tiny_folder, picture, tmp_path):
    out = tmp_path / "mine.png"
    out.write_bytes(b"precious")
    r = _cli(picture, "-o", out, "--model", tiny_folder, "--steps", "1", "--quiet")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert out.read_bytes() == b"precious"
    r = _cli(picture, "-o", out, "--model", tiny_folder, "--steps", "1", "--quiet", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes().startswith(b"\x89PNG")


def test_unreadable_input_is_a_clear_error(tiny_folder, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    r = _cli(bad, "-o", tmp_path / "o.png", "--model", tiny_folder)
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_offline_hub_model_is_a_clear_error(picture, tmp_path):
    r = _cli(picture, "-o", tmp_path / "o.png", "--model", "stabilityai/sd-x2-latent-upscaler")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "pass its path" in r.stderr
    assert not (tmp_path / "o.png").exists()


def test_help_and_version():
    r = _cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--guidance-scale" in r.stdout
    r = _cli("--version")
    assert r.returncode == 0 and "latent-upscale 0.1.0" in r.stdout
