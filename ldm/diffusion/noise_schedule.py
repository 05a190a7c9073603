"""The forward process q(x_t | x_0) of a discrete-time diffusion model, held in float64."""

from __future__ import annotations

import torch

from ldm.diffusion.schedules import make_betas, rescale_zero_terminal_snr


class NoiseSchedule:
    """alphas_cumprod of a beta schedule, and the forward-process quantities derived from it.

    Everything is stored in float64 and cast to the dtype and device of the tensors it is applied to.
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-d tensor, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must be finite and lie in (0, 1]")
        self.betas = betas
        self.spec: dict | None = None  # the from_name keywords, when built by name
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if (self.alphas_cumprod[1:] >= self.alphas_cumprod[:-1]).any():
            raise ValueError("alphas_cumprod must be strictly decreasing; check the beta schedule")

    @classmethod
    def from_name(
        cls,
        schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        rescale_betas_zero_snr: bool = False,
    ) -> NoiseSchedule:
        """Build the schedule by name (``linear``, ``scaled_linear``, ``cosine``), optionally zero-terminal-SNR.
        The keywords are kept as ``spec``, which checkpoints record so samplers rebuild the same schedule."""
        betas = make_betas(schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        built = cls(betas)
        built.spec = {"schedule": schedule, "num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
                      "beta_end": beta_end, "rescale_betas_zero_snr": rescale_betas_zero_snr}
        return built

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def has_zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def alpha_bar(self, t: torch.Tensor | int, like: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
        """alpha_bar at integer timesteps ``t`` (any shape), in the dtype and device of ``like`` if given.

        ``check=False`` skips the range check, for host timesteps known to be valid (the training loss's own draws):
        the check reads the values, which for timesteps on a GPU waits for the GPU."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            raise ValueError(f"timesteps must be integers, got dtype {t.dtype}")
        if check and ((t < 0).any() or (t >= self.num_train_timesteps).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.tolist()}")
        a = self.alphas_cumprod[t.cpu().long()]
        if like is not None:  # from pageable host memory: staged at once, without waiting for the GPU's queue
            a = a.to(dtype=like.dtype, device=like.device, non_blocking=True)
        return a

    def _per_sample(self, t: torch.Tensor | int, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        a = self.alpha_bar(t, like=x, check=check)
        return a.reshape(*a.shape, *([1] * (x.ndim - a.ndim)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, *,
                  check: bool = True) -> torch.Tensor:
        """Jump the forward process to timestep t: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        a = self._per_sample(t, x0, check)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def get_velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0."""
        a = self._per_sample(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def snr(self, t: torch.Tensor | int | None = None, *, check: bool = True) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) in float64, at ``t`` or for every timestep."""
        a = self.alphas_cumprod if t is None else self.alpha_bar(t, check=check)
        return a / (1 - a)

    def log_snr(self, t: torch.Tensor | int | None = None) -> torch.Tensor:
        """Natural log of the SNR (-inf at a zero-terminal-SNR last step)."""
        return self.snr(t).log()
