"""The configs of stabilityai/sd-x2-latent-upscaler's folder (reference diffusers-reference.md §2),
as the hub's JSON files have them, for tests that build the full-size architecture."""

# §2.2 unet/config.json (revision 12f0a89 and later)
HUB_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.13.0.dev0",
    "_name_or_path": "/home/patrick_huggingface_co/latent-upscaler/unet",
    "act_fn": "gelu", "attention_head_dim": 64, "block_out_channels": [384, 384, 768, 768],
    "center_input_sample": False, "class_embed_type": None, "conv_in_kernel": 1, "conv_out_kernel": 1,
    "cross_attention_dim": 768,
    "down_block_types": ["KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 8, "layers_per_block": 4, "mid_block_scale_factor": 1, "mid_block_type": None,
    "norm_eps": 1e-05, "norm_num_groups": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 5, "resnet_time_scale_shift": "scale_shift", "sample_size": None,
    "time_cond_proj_dim": 896, "time_embedding_type": "fourier", "timestep_post_act": "gelu",
    "up_block_types": ["KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"],
    "upcast_attention": False, "use_linear_projection": False,
}

# §2.4 vae/config.json (the SD kl-f8 VAE; the text itself was not seen, its size fits this)
HUB_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.13.0.dev0",
    "_name_or_path": "/home/patrick_huggingface_co/latent-upscaler/vae",
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# §2.3 scheduler/scheduler_config.json (revision f27ea45 and later)
HUB_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.13.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "interpolation_type": "log_linear", "prediction_type": "original_sample", "trained_betas": None,
}

# §2.5 text_encoder/config.json: CLIP ViT-L/14's text tower (keyword arguments of CLIPTextConfig);
# the library keeps it for --random-weights
from latent_upscaler.random_weights import HUB_TEXT_ENCODER  # noqa: E402,F401
