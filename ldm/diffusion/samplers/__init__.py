"""Reverse-process samplers: DDPM, DDIM (and DPM-Solver++ in dpm_solver.py)."""

from ldm.diffusion.samplers.base import DiscreteScheduler, SchedulerOutput
from ldm.diffusion.samplers.ddim import DDIMScheduler
from ldm.diffusion.samplers.ddpm import DDPMScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "DiscreteScheduler", "SchedulerOutput"]
