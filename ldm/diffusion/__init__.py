"""Diffusion math: beta schedules, the forward process, parameterizations, losses (diffusion and flow matching),
guidance, schedulers and the sampling loop."""

from ldm.diffusion.flow import FLOW_PREDICTION, FlowMatchingLoss
from ldm.diffusion.guidance import (
    AutoGuidance,
    ClassifierFreeGuidance,
    autoguidance,
    check_guidance_interval,
    classifier_free_guidance,
)
from ldm.diffusion.loss import DiffusionLoss, loss_weights, sample_timesteps
from ldm.diffusion.noise_schedule import NoiseSchedule
from ldm.diffusion.parameterization import convert_prediction, make_prediction, split_prediction
from ldm.diffusion.sampling import (
    FLOW_SAMPLERS,
    SAMPLERS,
    SamplingDefaults,
    default_sampler,
    is_flow_model,
    make_scheduler,
    sample_loop,
)
from ldm.diffusion.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    SchedulerOutput,
    UniPCMultistepScheduler,
)
from ldm.diffusion.schedules import make_betas, rescale_zero_terminal_snr

__all__ = [
    "FLOW_PREDICTION",
    "FLOW_SAMPLERS",
    "SAMPLERS",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchingLoss",
    "HeunDiscreteScheduler",
    "UniPCMultistepScheduler",
    "default_sampler",
    "is_flow_model",
    "AutoGuidance",
    "ClassifierFreeGuidance",
    "SamplingDefaults",
    "check_guidance_interval",
    "make_scheduler",
    "sample_loop",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "DiffusionLoss",
    "NoiseSchedule",
    "SchedulerOutput",
    "autoguidance",
    "classifier_free_guidance",
    "convert_prediction",
    "loss_weights",
    "make_betas",
    "make_prediction",
    "rescale_zero_terminal_snr",
    "sample_timesteps",
    "split_prediction",
]
