"""The ``latent-upscale`` command, run as a user runs it: a subprocess on a tiny model folder."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

# one thread per CLI process: the tiny model gains nothing from more, and oversubscribed cores slow
# OpenMP down by orders of magnitude
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "latent_upscaler.cli"]


def _cli(*args, cwd=None, stdin=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd,
                          input=stdin, timeout=300)


def _run(capsys, *args):
    """The command in this process (for checks that need no fresh interpreter): (code, stdout, stderr)."""
    import torch

    from latent_upscaler.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, out, err


def _save_noise(path, size=(56, 40), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode).save(path)
    return path


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"), dtype=np.int16)


def _temporaries(folder):
    return [p for p in folder.rglob(".latent-upscale-*")]


@pytest.fixture
def picture(tmp_path):
    return _save_noise(tmp_path / "in.png")


# ---- one file to one file (the original command) ----

def test_upscales_a_file(tiny_folder, picture, tmp_path, capsys):
    out = tmp_path / "out" / "big.png"
    r = _cli(picture, "-o", out, "--model", tiny_folder, "--steps", "2", "--seed", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    with Image.open(out) as image:
        assert image.size == (112, 80)
    again = tmp_path / "again.png"
    code, _, err = _run(capsys, picture, "-o", again, "--model", tiny_folder, "--steps", "2", "--seed", "3", "--quiet")
    assert code == 0, err
    assert out.read_bytes() == again.read_bytes()  # same seed, same bytes
    assert not _temporaries(out.parent)


def test_never_overwrites_without_asking(tiny_folder, picture, tmp_path, capsys):
    out = tmp_path / "mine.png"
    out.write_bytes(b"precious")
    r = _cli(picture, "-o", out, "--model", tiny_folder, "--steps", "1", "--quiet")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert out.read_bytes() == b"precious"
    code, _, err = _run(capsys, picture, "-o", out, "--model", tiny_folder, "--steps", "1", "--quiet", "--overwrite")
    assert code == 0, err
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


def test_help_and_version(capsys):
    r = _cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--guidance-scale" in r.stdout
    for option in ("--output-dir", "--name", "--recursive", "--prompt-file", "--batch-size", "--random-weights",
                   "--sampler", "--sigma-schedule", "--noise-level", "--json", "--quality", "info", "convert"):
        assert option in r.stdout, option
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and "latent-upscale 0.1.0" in out
    for command, expected in (("info", "--json"), ("convert", "--components"), ("upscale", "--output-dir")):
        code, out, _ = _run(capsys, command, "--help")
        assert code == 0 and "examples:" in out and expected in out


# ---- folders ----

def test_folder_of_good_and_broken_images(tiny_folder, tmp_path):
    photos = tmp_path / "photos"
    _save_noise(photos / "a.png", seed=1)
    _save_noise(photos / "b.jpg", seed=2)
    _save_noise(photos / "sub" / "c.png", size=(32, 24), seed=3, mode="RGBA")
    (photos / "broken.png").write_bytes(b"not an image")
    data = _save_noise(tmp_path / "t.png", seed=4).read_bytes()
    (photos / "truncated.png").write_bytes(data[: len(data) // 2])  # a valid header, then nothing
    (photos / "notes.txt").write_text("not an image, and not named like one: ignored")
    out = tmp_path / "big"
    r = _cli(photos, "--recursive", "--output-dir", out, "--model", tiny_folder, "--steps", "1", "--seed", "10",
             "--batch-size", "2", "--json")
    assert r.returncode == 2, r.stderr
    summary = json.loads(r.stdout)  # nothing but JSON on standard output
    status = {os.path.relpath(i["input"], photos): i for i in summary["images"]}
    assert sorted(status) == ["a.png", "b.jpg", "broken.png", os.path.join("sub", "c.png"), "truncated.png"]
    for name in ("a.png", "b.jpg", os.path.join("sub", "c.png")):
        assert status[name]["status"] == "done" and status[name]["seconds"] > 0
    for name in ("broken.png", "truncated.png"):
        assert status[name]["status"] == "failed" and "cannot read" in status[name]["error"]
        assert f"{name}" in r.stderr
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 2, "pending": 0}
    # seeds follow the inputs' order: a, b, broken, sub/c, truncated
    assert [status[n]["seed"] for n in ("a.png", "b.jpg", "broken.png")] == [10, 11, 12]
    with Image.open(out / "a_2x.png") as a, Image.open(out / "sub" / "c_2x.png") as c:
        assert a.size == (112, 80) and a.mode == "RGB"
        assert c.size == (64, 48) and c.mode == "RGBA"  # alpha kept
    assert (out / "b_2x.png").exists()
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a_2x.png", "b_2x.png", "c_2x.png"]


def test_existing_outputs_are_untouched_and_skipped(tiny_folder, tmp_path, capsys):
    photos = tmp_path / "photos"
    _save_noise(photos / "a.png", seed=1)
    _save_noise(photos / "b.png", seed=2)
    out = tmp_path / "big"
    out.mkdir()
    (out / "a_2x.png").write_bytes(b"precious")
    code, summary, err = _run(capsys, photos, "-d", out, "--model", tiny_folder, "--steps", "1", "--json")
    assert code == 0, err
    assert [i["status"] for i in json.loads(summary)["images"]] == ["skipped", "done"]
    assert (out / "a_2x.png").read_bytes() == b"precious"
    code, _, err = _run(capsys, photos, "-d", out, "--model", tiny_folder, "--steps", "1", "--no-resume")
    assert code == 2 and "--overwrite" in err
    code, _, err = _run(capsys, photos, "-d", out, "--model", tiny_folder, "--steps", "1", "--overwrite", "--quiet")
    assert code == 0, err
    assert (out / "a_2x.png").read_bytes().startswith(b"\x89PNG")


def test_killed_run_resumes_and_writes_each_output_once(tiny_folder, tmp_path):
    photos = tmp_path / "photos"
    for i in range(6):
        _save_noise(photos / f"{i}.png", size=(40, 32), seed=i)
    out = tmp_path / "big"
    out.mkdir()
    # the temporary file of a run killed earlier: its process is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".latent-upscale-{dead.pid}-x1y2.png"
    stale.write_bytes(b"half an image")
    args = [photos, "-d", out, "--model", tiny_folder, "--steps", "30", "--seed", "1", "--quiet"]

    proc = subprocess.Popen([*CLI, *map(str, args)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(out.glob("*_2x.png")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*_2x.png")}
    assert 1 <= len(before) < 6, "the run should have been killed in the middle"

    r = _cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    statuses = [i["status"] for i in json.loads(r.stdout)["images"]]
    assert statuses.count("skipped") == len(before) and statuses.count("done") == 6 - len(before)
    assert sorted(p.name for p in out.iterdir()) == [f"{i}_2x.png" for i in range(6)]  # no temporaries left
    for name, stat in before.items():  # written before the kill: not written again
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stat
    for i in range(6):
        with Image.open(out / f"{i}_2x.png") as image:
            image.load()  # complete files
            assert image.size == (80, 64)


def test_same_seed_same_bytes_and_batch_size_changes_at_most_one_level(tiny_folder, tmp_path):
    photos = tmp_path / "photos"
    for i in range(3):
        _save_noise(photos / f"{i}.png", size=(40, 32), seed=i)
    _save_noise(photos / "3.png", size=(24, 24), seed=3)
    common = ["--model", tiny_folder, "--steps", "2", "--prompt", "a squirrel", "--quiet"]
    for folder, batch in (("one", 1), ("three", 3)):
        r = _cli(photos, "-d", tmp_path / folder, "--batch-size", batch, "--seed", "5", *common)
        assert r.returncode == 0, r.stderr
    names = [f"{i}_2x.png" for i in range(4)]
    for name in names:
        diff = np.abs(_pixels(tmp_path / "one" / name) - _pixels(tmp_path / "three" / name)).max()
        assert diff <= 1, (name, diff)
    assert np.abs(_pixels(tmp_path / "one" / names[0]) - _pixels(tmp_path / "one" / names[1])).max() > 10

    # the seed stored in an output makes that image again on its own, byte for byte (metadata included)
    from latent_upscaler.metadata import read_settings

    seed = read_settings(tmp_path / "one" / "2_2x.png")["seed"]
    assert seed == 7
    single = tmp_path / "single" / "2_2x.png"
    r = _cli(photos / "2.png", "-o", single, "--seed", seed, *common)
    assert r.returncode == 0, r.stderr
    assert single.read_bytes() == (tmp_path / "one" / "2_2x.png").read_bytes()


# ---- names, formats, prompts, standard input ----

def test_names_prompts_and_paths_from_standard_input(tiny_folder, tmp_path, capsys, monkeypatch):
    a = _save_noise(tmp_path / "in" / "a.png", seed=1)
    b = _save_noise(tmp_path / "in" / "b.png", seed=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red/blue castle?\nthe sea\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["-", "-d", out, "--name", "{index:02d}-{prompt}-{seed}.jpg", "--quality", "90", "--prompt-file", prompts,
            "--seed", "4", "--model", tiny_folder, "--steps", "1", "--guidance-scale", "2", "--sampler", "heun",
            "-n", "blurry"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{a}\n{b}\n"))
    code, listing, err = _run(capsys, *args, "--dry-run")
    assert code == 0, err
    assert "00-a_red_blue_castle-4.jpg" in listing and "01-the_sea-5.jpg" in listing and not out.exists()
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{a}\n{b}\n"))
    code, _, err = _run(capsys, *args, "--quiet")
    assert code == 0, err
    first, second = out / "00-a_red_blue_castle-4.jpg", out / "01-the_sea-5.jpg"
    with Image.open(first) as image:
        assert image.format == "JPEG" and image.size == (112, 80)

    r = _cli("info", first, second)
    assert r.returncode == 0, r.stderr
    for expected in ('prompt:', '"a red/blue castle?"', '"the sea"', '"blurry"', "seed:", " 4", " 5",
                     "num_inference_steps: 1", "guidance_scale:", "2.0", '"heun"', str(tiny_folder), "0.1.0",
                     "to make it again: latent-upscale a.png -o 00-a_red_blue_castle-4.jpg"):
        assert expected in r.stdout, expected
    code, line, _ = _run(capsys, "info", "--json", first)
    settings = json.loads(line)["settings"]
    assert settings["negative_prompt"] == "blurry" and settings["sampler"] == "heun"
    assert settings["model"] == str(tiny_folder) and settings["input_size"] == [56, 40]

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{a}\n"))  # one path, two prompts
    code, _, err = _run(capsys, *args)
    assert code == 2 and "2 lines for 1 input images" in err


def test_info_on_files_without_settings(picture, tmp_path, capsys):
    code, out, _ = _run(capsys, "info", picture)
    assert code == 1 and "no latent-upscale settings" in out
    (tmp_path / "x.png").write_bytes(b"nope")
    code, _, err = _run(capsys, "info", tmp_path / "x.png")
    assert code == 2 and "cannot read" in err


@pytest.mark.parametrize("args, message", [
    (["-o", "x.png", "-d", "out"], "not both"),
    ([], "--output-dir"),
    (["-d", "out", "--name", "{stem}_{size}.png"], "unknown field {size}"),
    (["-d", "out", "--name", "{stem}.tiff"], "cannot write .tiff"),
    (["-d", "out", "--quality", "80"], "PNG is lossless"),
    (["-d", "out", "--random-weights", "--model", "someone/else"], "--random-weights"),
    (["-d", "out", "--max-memory", "lots"], "--max-memory 'lots' is not understood"),
    (["-d", "out", "--tile-size", "0"], "--tile-size must be positive"),
])
def test_argument_errors(picture, args, message, capsys):
    code, _, err = _run(capsys, picture, *args)
    assert code == 2 and message in err


def test_settings_the_pipeline_refuses_stop_the_run(tiny_folder, tmp_path, capsys):
    for i in range(2):
        _save_noise(tmp_path / "in" / f"{i}.png", seed=i)
    code, _, err = _run(capsys, tmp_path / "in", "-d", tmp_path / "out", "--model", tiny_folder, "--steps", "1",
                        "--eta", "0.5")  # euler is deterministic
    assert code == 2 and err.count("takes no eta") == 1 and "2 not started" in err
    assert not (tmp_path / "out").exists()


def test_memory_options_reach_the_pipeline(tiny_folder, tmp_path, capsys):
    _save_noise(tmp_path / "in" / "a.png", size=(64, 48))
    code, _, err = _run(capsys, tmp_path / "in", "-d", tmp_path / "out", "--model", tiny_folder, "--steps", "1",
                        "--max-memory", "100MB")
    assert code == 2 and "max_memory" in err and "too small" in err and "at least" in err
    assert not (tmp_path / "out").exists()
    code, _, err = _run(capsys, tmp_path / "in", "-d", tmp_path / "tiled", "--model", tiny_folder, "--steps", "1",
                        "--max-memory", "none", "--tile-size", "256", "--vae-tile-size", "256", "--seed", "3")
    assert code == 0, err
    (output,) = (tmp_path / "tiled").iterdir()
    code, out, _ = _run(capsys, "info", output)
    assert code == 0 and "--tile-size 256" in out and "--vae-tile-size 256" in out and "--max-memory none" in out


def test_missing_paths_are_reported_and_the_rest_done(tiny_folder, picture, tmp_path, capsys):
    code, _, err = _run(capsys, picture, tmp_path / "nothing.png", tmp_path / "*.webp", "-d", tmp_path / "out",
                        "--model", tiny_folder, "--steps", "1", "--quiet")
    assert code == 2
    assert "nothing.png: no such file" in err and "no image matches" in err
    assert (tmp_path / "out" / "in_2x.png").exists()


# ---- random weights ----

def test_random_weights_flag_says_its_output_is_noise(tiny_folder, picture, tmp_path, capsys):
    out = tmp_path / "noise.png"
    code, _, err = _run(capsys, picture, "-o", out, "--random-weights", "--model", tiny_folder, "--steps", "1",
                        "--seed", "0", "--quiet")
    assert code == 0, err
    assert "RANDOM WEIGHTS" in err and "NOISE" in err  # even with --quiet
    from latent_upscaler.metadata import read_settings

    assert read_settings(out)["random_weights"] is True


def test_random_pipeline_has_the_hub_architecture():
    import torch
    from hub_configs import HUB_SCHEDULER, HUB_UNET, HUB_VAE

    from latent_upscaler.models.unet import UNetConfig
    from latent_upscaler.models.vae import VAEConfig
    from latent_upscaler.random_weights import random_pipeline
    from latent_upscaler.scheduler import SchedulerConfig

    with torch.device("meta"):
        pipe = random_pipeline()
    assert pipe.unet.config == UNetConfig.from_dict(HUB_UNET)
    assert pipe.vae.config == VAEConfig.from_dict(HUB_VAE)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 372_560_645
    text = pipe.text_encoder.config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (768, 12, 49408)
    assert pipe.scheduler.config == SchedulerConfig.from_dict(HUB_SCHEDULER)
    assert len(pipe.tokenizer) in (49408, 514)


def test_byte_level_tokenizer_fits_clip():
    from latent_upscaler.clip_vocab import build_byte_level_tokenizer

    ids = build_byte_level_tokenizer()("a café").input_ids
    assert ids[0] == 512 and ids[-1] == 513 and max(ids) < 49408 and len(ids) == 2 + 1 + 5  # 'é' is two bytes


def test_random_weights_are_seeded(tiny_folder):
    from latent_upscaler.random_weights import random_pipeline

    a, b, c = (random_pipeline(tiny_folder, seed=s) for s in (1, 1, 2))
    w = "conv_in.weight"
    assert (a.unet.state_dict()[w] == b.unet.state_dict()[w]).all()
    assert not (a.unet.state_dict()[w] == c.unet.state_dict()[w]).all()


# ---- convert ----

@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory):
    """A tiny original k-diffusion checkpoint (the release's layout) whose cross-attention width is the
    tiny folder's text encoder's (32)."""
    import torch
    from test_original_checkpoint import TINY, _kdiffusion_model

    from latent_upscaler.loading.original import NOISE_EMBED

    folder = tmp_path_factory.mktemp("original")
    torch.manual_seed(0)
    state = {f"inner_model.{k}": v for k, v in _kdiffusion_model(TINY).state_dict().items()}
    state[NOISE_EMBED] = torch.randn(64, 1) * 2
    (folder / "config.json").write_text(json.dumps({"model": TINY}))
    torch.save({"model_ema": state}, folder / "model.pth")
    return folder


def test_convert_writes_a_folder_that_upscales(original_checkpoint, tiny_folder, picture, tmp_path, capsys):
    out = tmp_path / "converted"
    args = ["convert", original_checkpoint / "model.pth", "--config", original_checkpoint / "config.json",
            "--components", tiny_folder, "-o", out]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    unet_config = json.loads((out / "unet" / "config.json").read_text())
    assert unet_config["block_out_channels"] == [64, 64, 128, 128]
    assert (out / "unet" / "low_res_noise_embed.safetensors").exists()
    assert not _temporaries(tmp_path)

    code, _, err = _run(capsys, picture, "-o", tmp_path / "up.png", "--model", out, "--noise-level", "0.5",
                        "--steps", "1", "--quiet")
    assert code == 0, err

    code, _, err = _run(capsys, *args)  # the folder exists now
    assert code == 2 and "--overwrite" in err
    (out / "mine.txt").write_text("old")
    code, _, err = _run(capsys, *args, "--overwrite", "--quiet")
    assert code == 0, err
    assert not (out / "mine.txt").exists() and (out / "model_index.json").exists()


def test_convert_errors_are_messages(original_checkpoint, tiny_folder, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = _run(capsys, "convert", bad, "--config", original_checkpoint / "config.json", "--components",
                        tiny_folder, "-o", tmp_path / "x")
    assert code == 1 and "cannot convert" in err
    assert not (tmp_path / "x").exists()
    config = tmp_path / "other.json"  # another architecture than the checkpoint's
    config.write_text(json.dumps({"model": {**json.loads((original_checkpoint / "config.json").read_text())["model"],
                                            "depths": [1, 1, 1, 1]}}))
    code, _, err = _run(capsys, "convert", original_checkpoint / "model.pth", "--config", config,
                        "--components", tiny_folder, "-o", tmp_path / "x")
    assert code == 1 and "cannot convert" in err and "missing" in err
    code, _, err = _run(capsys, "convert", tmp_path / "missing.pth", "-o", tmp_path / "x")
    assert code == 2 and "no such file" in err
    assert not (tmp_path / "x").exists()


# ---- library pieces ----

def test_safe_names_and_patterns():
    from latent_upscaler.files import check_name_pattern, output_name, safe_for_file_name

    assert safe_for_file_name("A castle / on a hill?") == "A_castle_on_a_hill"
    assert safe_for_file_name("../../etc") == "etc" and safe_for_file_name("") == "prompt"
    assert len(safe_for_file_name("x" * 500)) == 60
    assert output_name("{stem}_{index:03d}", stem="a.b", index=7, seed=1, prompt="") == "a.b_007.png"
    assert output_name("{stem}.WEBP", stem="a", index=0, seed=1, prompt="") == "a.WEBP"
    assert check_name_pattern("{stem}.jpeg") == ".jpeg"
    with pytest.raises(ValueError, match="unknown field"):
        check_name_pattern("{0}.png")


def test_batches_group_images_of_one_size():
    from latent_upscaler.batch import Job, batches

    jobs = [Job(i, f"{i}", f"o{i}", i, "", size=s, alpha=a)
            for i, (s, a) in enumerate([((8, 8), False), ((8, 16), False), ((8, 8), False), ((8, 8), True),
                                        ((8, 8), False)])]
    groups = [[j.index for j in g] for g in batches(jobs, 2)]
    assert groups == [[0, 2], [1], [3], [4]]
    assert [[j.index for j in g] for g in batches(jobs, 1)] == [[0], [1], [2], [3], [4]]
