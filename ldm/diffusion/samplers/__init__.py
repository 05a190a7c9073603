"""Reverse-process samplers: DDPM, DDIM and DPM-Solver++ (2M)."""

from ldm.diffusion.samplers.base import DiscreteScheduler, SchedulerOutput
from ldm.diffusion.samplers.ddim import DDIMScheduler
from ldm.diffusion.samplers.ddpm import DDPMScheduler
from ldm.diffusion.samplers.dpm_solver import DPMSolverMultistepScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "DiscreteScheduler", "SchedulerOutput"]
