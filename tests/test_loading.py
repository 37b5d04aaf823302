"""Folders in the hub layout: ours load in diffusers and theirs in ours, including the forms the real
hub folder has (written by diffusers 0.13 and transformers 4)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROMPT, floats_tensor, generator, max_diff

from latent_upscaler import StableDiffusionLatentUpscalePipeline
from latent_upscaler.loading.hub import ModelNotAvailableError
from latent_upscaler.models.base import WeightsMismatchError


def _upscale(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt=PROMPT, image=floats_tensor((1, 4, 8, 8)), num_inference_steps=2, generator=generator(0),
                output_type="np")
    args.update(kw)
    return pipe(**args).images


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_our_folder_loads_in_diffusers_with_equal_output(tiny_pipe, tmp_path, safe):
    from diffusers import StableDiffusionLatentUpscalePipeline as Theirs

    tiny_pipe.save_pretrained(tmp_path, safe_serialization=safe)
    theirs = Theirs.from_pretrained(tmp_path)
    assert max_diff(_upscale(theirs), _upscale(tiny_pipe)) <= 1e-5
    ours_again = StableDiffusionLatentUpscalePipeline.from_pretrained(tmp_path)
    assert max_diff(_upscale(ours_again), _upscale(tiny_pipe)) == 0.0
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionLatentUpscalePipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_diffusers_folder_loads_in_ours_with_equal_output(tiny_diffusers_pipe, tiny_pipe):
    assert max_diff(_upscale(tiny_diffusers_pipe), _upscale(tiny_pipe)) <= 1e-5


def _legacy_folder(src, dst):
    """Rewrite a diffusers folder into the hub's 2023 form: .bin weights, old VAE attention names
    (some as 1×1 conv weights), ``text_model.``-prefixed CLIP keys, a 0.13-era config."""
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    for name in ("unet", "vae"):
        folder = dst / name
        state = load_file(folder / "diffusion_pytorch_model.safetensors")
        (folder / "diffusion_pytorch_model.safetensors").unlink()
        if name == "vae":
            renamed = {}
            for key, value in state.items():
                for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
                    if f".attentions.0.{new}." in key:
                        key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
                        if key.endswith("weight") and "encoder." in key:  # conv-shaped in the encoder only
                            value = value[:, :, None, None]
                renamed[key] = value
            assert any("proj_attn" in k for k in renamed) and any(v.ndim == 4 and "query" in k for k, v in renamed.items())
            state = renamed
        torch.save(state, folder / "diffusion_pytorch_model.bin")
        config = json.loads((folder / "config.json").read_text())
        config["_diffusers_version"] = "0.13.0.dev0"
        (folder / "config.json").write_text(json.dumps(config))
    text = dst / "text_encoder"
    state = load_file(text / "model.safetensors")
    (text / "model.safetensors").unlink()
    torch.save({("text_model." + k if not k.startswith("text_model.") else k): v for k, v in state.items()},
               text / "pytorch_model.bin")
    return dst


def test_hub_2023_folder_form_loads(tiny_folder, tiny_pipe, tmp_path):
    folder = _legacy_folder(tiny_folder, tmp_path / "legacy")
    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(folder)
    assert max_diff(_upscale(pipe), _upscale(tiny_pipe)) == 0.0
    with pytest.raises(FileNotFoundError, match="use_safetensors"):
        StableDiffusionLatentUpscalePipeline.from_pretrained(folder, use_safetensors=True)


def test_bin_files_never_run_code(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "evil")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"payload": _Payload()}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        StableDiffusionLatentUpscalePipeline.from_pretrained(folder)
    assert not _Payload.ran


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():  # pragma: no cover - must never be called
        _Payload.ran = True


@pytest.mark.parametrize("kw", [{"dtype": torch.bfloat16}, {"torch_dtype": torch.bfloat16}])
def test_dtype(tiny_folder, kw):
    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(tiny_folder, **kw)
    assert pipe.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16
    out = _upscale(pipe, output_type="pt")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_variant(tiny_pipe, tmp_path):
    half = StableDiffusionLatentUpscalePipeline(**tiny_pipe.components)
    half.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(tmp_path, variant="fp16")
    assert max_diff(_upscale(pipe), _upscale(tiny_pipe)) == 0.0
    with pytest.raises(FileNotFoundError, match="variant"):
        StableDiffusionLatentUpscalePipeline.from_pretrained(tmp_path)


def test_offline_hub_id_fails_at_once_with_a_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="pass its path"):
        StableDiffusionLatentUpscalePipeline.from_pretrained("stabilityai/sd-x2-latent-upscaler",
                                                             cache_dir=str(tmp_path))


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="not a folder"):
        StableDiffusionLatentUpscalePipeline.from_pretrained(str(tmp_path / "missing" / "here"))


def test_wrong_pipeline_folder(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "sd15")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a StableDiffusionLatentUpscalePipeline"):
        StableDiffusionLatentUpscalePipeline.from_pretrained(folder)


def test_mismatched_weights_list_the_keys(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_folder, tmp_path / "broken")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state.pop("conv_in.weight")
    state["conv_out.bias"] = torch.zeros(7)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(WeightsMismatchError) as info:
        StableDiffusionLatentUpscalePipeline.from_pretrained(folder)
    message = str(info.value)
    assert "missing: conv_in.weight" in message and "unexpected: extra.weight" in message
    assert "conv_out.bias: checkpoint (7,), model (5,)" in message


def test_components_can_be_passed_in(tiny_folder, tiny_pipe):
    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(tiny_folder, unet=tiny_pipe.unet)
    assert pipe.unet is tiny_pipe.unet
    assert set(pipe.components) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
    with pytest.raises(TypeError, match="unexpected"):
        StableDiffusionLatentUpscalePipeline.from_pretrained(tiny_folder, safety_checker=None)
