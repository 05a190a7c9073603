"""Diffusion math: beta schedules, the forward process, parameterizations, losses, guidance and samplers."""

from ldm.diffusion.guidance import autoguidance, classifier_free_guidance, guided_denoiser
from ldm.diffusion.loss import DiffusionLoss, loss_weights, sample_timesteps
from ldm.diffusion.noise_schedule import NoiseSchedule
from ldm.diffusion.parameterization import convert_prediction, make_prediction, split_prediction
from ldm.diffusion.samplers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerOutput
from ldm.diffusion.schedules import make_betas, rescale_zero_terminal_snr

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "DiffusionLoss",
    "NoiseSchedule",
    "SchedulerOutput",
    "autoguidance",
    "classifier_free_guidance",
    "convert_prediction",
    "guided_denoiser",
    "loss_weights",
    "make_betas",
    "make_prediction",
    "rescale_zero_terminal_snr",
    "sample_timesteps",
    "split_prediction",
]
