"""σ schedules against diffusers' EulerDiscreteScheduler (reference §4, §8.4), and config handling."""

from __future__ import annotations

import json

import pytest
import torch

from hub_configs import HUB_SCHEDULER as HUB

from latent_upscaler.configuration import ConfigError
from latent_upscaler.scheduler import EulerDiscreteScheduler

TEST = {"prediction_type": "sample"}  # diffusers' test scheduler: linear betas, linear interpolation


def _theirs(config):
    from diffusers import EulerDiscreteScheduler as Theirs

    return Theirs.from_config(config)


@pytest.mark.parametrize("steps", [1, 2, 20, 75])
@pytest.mark.parametrize("config", [HUB, {**HUB, "timestep_spacing": "leading", "steps_offset": 1},
                                    {**HUB, "interpolation_type": "linear", "timestep_spacing": "trailing"}],
                         ids=["hub", "leading", "linear-trailing"])
def test_sigmas_equal_diffusers(config, steps):
    theirs = _theirs(config)
    theirs.set_timesteps(steps)
    ours = EulerDiscreteScheduler.from_config(config).schedule(steps)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.equal(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma))


def test_hub_schedule_runs_log_linear_to_sigma_min():
    s = EulerDiscreteScheduler.from_config(HUB).schedule(20)
    assert len(s.sigmas) == 22 and s.sigmas[-1] == 0
    assert s.sigmas[0].item() == pytest.approx(14.614647, rel=1e-6)
    assert s.sigmas[20].item() == pytest.approx(0.02916754, rel=1e-5)
    ratios = s.sigmas[1:21] / s.sigmas[:20]
    assert torch.allclose(ratios, ratios[0].expand(20), rtol=1e-5)  # log-uniform spacing


def test_test_scheduler_values():
    theirs = _theirs(TEST)
    s = EulerDiscreteScheduler.from_config(dict(theirs.config)).schedule(2)
    assert s.sigmas.tolist() == pytest.approx([157.40727, 0.01000133, 0.0], rel=1e-6)


def test_config_round_trip_through_diffusers(tmp_path):
    ours = EulerDiscreteScheduler.from_config(HUB)
    ours.save_pretrained(tmp_path)
    from diffusers import EulerDiscreteScheduler as Theirs

    theirs = Theirs.from_pretrained(tmp_path)
    assert theirs.config.interpolation_type == "log_linear"
    assert theirs.config.prediction_type == "original_sample"
    theirs.save_pretrained(tmp_path / "back")
    again = EulerDiscreteScheduler.from_pretrained(tmp_path / "back")
    assert again.config == ours.config


@pytest.mark.parametrize("field,value", [("prediction_type", "epsilon"), ("interpolation_type", "cosine"),
                                         ("beta_schedule", "squaredcos_cap_v2"), ("use_karras_sigmas", True),
                                         ("some_new_field", 1)])
def test_unsupported_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        EulerDiscreteScheduler.from_config({**HUB, field: value})


def test_early_hub_revision_without_interpolation_type_is_refused(tmp_path):
    raw = {k: v for k, v in HUB.items() if k != "interpolation_type"}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="interpolation_type"):
        EulerDiscreteScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_step_counts(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        EulerDiscreteScheduler.from_config(HUB).schedule(steps)
