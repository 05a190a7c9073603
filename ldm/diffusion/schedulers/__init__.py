"""The schedulers of the reverse process (diffusers API and numbers): DDPM, DDIM, DPM-Solver++ (2M, optionally on
Karras levels), UniPC, the sigma-space samplers Euler, Euler ancestral and Heun, and flow matching's Euler."""

from ldm.diffusion.schedulers.base import DiscreteScheduler, SchedulerOutput
from ldm.diffusion.schedulers.ddim import DDIMScheduler
from ldm.diffusion.schedulers.ddpm import DDPMScheduler
from ldm.diffusion.schedulers.dpm_solver import DPMSolverMultistepScheduler
from ldm.diffusion.schedulers.euler import EulerDiscreteScheduler
from ldm.diffusion.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from ldm.diffusion.schedulers.flow_match import FlowMatchEulerDiscreteScheduler
from ldm.diffusion.schedulers.heun import HeunDiscreteScheduler
from ldm.diffusion.schedulers.unipc import UniPCMultistepScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "DiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "SchedulerOutput",
    "UniPCMultistepScheduler",
]
