"""Checkpoint import and export: diffusers models and folders, original Stable Diffusion single files."""

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
from ldm.convert.single_file import (
    SDCheckpoint,
    infer_unet_config,
    infer_vae_config,
    load_sd_checkpoint,
    read_state_dict,
    save_state_dict,
    to_sd_state_dict,
)

__all__ = [
    "SDCheckpoint",
    "from_diffusers",
    "infer_unet_config",
    "infer_vae_config",
    "load_sd_checkpoint",
    "load_state_dict_checked",
    "read_state_dict",
    "save_state_dict",
    "to_diffusers",
    "to_diffusers_state_dict",
    "to_sd_state_dict",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
]
