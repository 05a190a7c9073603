"""Checkpoint import and export: diffusers models and folders, original Stable Diffusion single files, and starting
a model from one."""

from ldm.convert.diffusers_format import (
    from_diffusers,
    load_state_dict_checked,
    to_diffusers,
    to_diffusers_state_dict,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)
from ldm.convert.initialize import init_from_sd, load_sd_vae, sd_latent_scale, sd_text_state_dict
from ldm.convert.single_file import (
    SDCheckpoint,
    infer_clip_text_config,
    infer_open_clip_text_config,
    infer_unet_config,
    infer_vae_config,
    load_sd_checkpoint,
    load_sd_text_encoder,
    read_state_dict,
    save_state_dict,
    sd_checkpoint_from_state_dict,
    sd_text_family,
    text_encoder_sd_state_dict,
    to_sd_state_dict,
)

__all__ = [
    "SDCheckpoint",
    "from_diffusers",
    "infer_clip_text_config",
    "init_from_sd",
    "infer_open_clip_text_config",
    "infer_unet_config",
    "infer_vae_config",
    "load_sd_checkpoint",
    "load_sd_text_encoder",
    "load_sd_vae",
    "load_state_dict_checked",
    "read_state_dict",
    "save_state_dict",
    "sd_checkpoint_from_state_dict",
    "sd_latent_scale",
    "sd_text_family",
    "sd_text_state_dict",
    "text_encoder_sd_state_dict",
    "to_diffusers",
    "to_diffusers_state_dict",
    "to_sd_state_dict",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
]
