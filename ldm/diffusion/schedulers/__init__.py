"""The schedulers of the reverse process (diffusers API and numbers): DDPM, DDIM and DPM-Solver++ (2M)."""

from ldm.diffusion.schedulers.base import DiscreteScheduler, SchedulerOutput
from ldm.diffusion.schedulers.ddim import DDIMScheduler
from ldm.diffusion.schedulers.ddpm import DDPMScheduler
from ldm.diffusion.schedulers.dpm_solver import DPMSolverMultistepScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "DiscreteScheduler", "SchedulerOutput"]
