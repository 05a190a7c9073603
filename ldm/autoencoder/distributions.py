"""The diagonal Gaussian posterior that the KL autoencoder's encoder outputs."""

from __future__ import annotations

import math

import torch


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from ``parameters`` = cat(mean, logvar) along dim 1 (logvar clamped to [-30, 20])."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.shape[1] % 2:
            raise ValueError(f"parameters need an even channel count (mean and logvar), got {parameters.shape[1]}")
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean)
        self.std = torch.exp(0.5 * self.logvar) if not deterministic else torch.zeros_like(self.mean)
        self.var = torch.exp(self.logvar) if not deterministic else torch.zeros_like(self.mean)

    def _reduce_dims(self) -> list[int]:
        """All dimensions but the batch."""
        return list(range(1, self.mean.ndim))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw mean + std * eps, eps from ``generator`` on its own device (a CPU generator serves any device)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device, non_blocking=True)  # a blocking copy waits for the GPU

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample [B], summed over non-batch dims; ``other`` None is the standard normal."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = self._reduce_dims()
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: list[int] | None = None) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` per batch element, summed over ``dims`` (default non-batch dims)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = self._reduce_dims() if dims is None else dims
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims)
