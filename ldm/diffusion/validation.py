"""A deterministic validation loss (as MLPerf's diffusion benchmark reports one): the training objective's unweighted
MSE at K fixed timesteps, with noise that depends only on each sample's index in the validation set.

With the timesteps and the noise fixed, the value is a function of the weights and the validation set alone: it
does not depend on the batch size, the number of ranks, the order of the batches or when it runs, so curves of runs
with different settings compare point by point, and a sweep can select on it.

- Timesteps: the centres of K equal bins of [0, T), ``(2k + 1) T // 2K`` (for T = 1000, K = 8: 62, 187, ..., 937),
  so no level is a degenerate end point (t = 0 is almost noise-free, t = T - 1 almost pure noise).
- Flow matching: the noise levels sigma = t / T of the same timesteps (0.062, ..., 0.937), without the training
  shift (the levels are the evaluation protocol, not a training density); they are reported by t = sigma T, the
  timestep the network sees.
- Noise: for sample ``i``, ``torch.Generator().manual_seed(seed + i)`` draws one standard normal tensor per timestep
  on the CPU in float32 (the same numbers on any device). Offset noise is not added: the metric measures the
  model's forward process, so runs that differ in ``offset_noise`` compare on the same footing.
- Loss: the training target of the objective (epsilon, v, x0 or the flow velocity), unweighted (min-SNR or SD3
  weightings are a training choice, not part of the measurement).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ldm.diffusion.flow import FlowMatchingLoss
from ldm.diffusion.loss import DiffusionLoss

DEFAULT_NUM_TIMESTEPS = 8


def validation_timesteps(num_train_timesteps: int, k: int = DEFAULT_NUM_TIMESTEPS) -> list[int]:
    """The ``k`` fixed validation timesteps: the centres of k equal bins of [0, num_train_timesteps)."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_train_timesteps:
        raise ValueError(f"the number of validation timesteps must be an integer in [1, {num_train_timesteps}], "
                         f"got {k!r}")
    return [(2 * j + 1) * num_train_timesteps // (2 * k) for j in range(k)]


def objective_timesteps(objective: DiffusionLoss | FlowMatchingLoss) -> int:
    """T, the number of training timesteps of ``objective`` (the range the validation timesteps divide)."""
    if isinstance(objective, FlowMatchingLoss):
        return objective.num_train_timesteps
    return objective.schedule.num_train_timesteps


def validation_noise(sample_shape: Sequence[int], indices: Sequence[int] | torch.Tensor, num_timesteps: int,
                     seed: int = 0) -> torch.Tensor:
    """Noise [num_timesteps, B, *sample_shape] (float32, CPU): sample ``indices[b]``'s comes from its own generator
    seeded ``seed + index``, so it is the same in any batch, on any rank, at any time."""
    idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    out = torch.empty(num_timesteps, len(idx), *sample_shape)
    for b, i in enumerate(idx):
        g = torch.Generator().manual_seed(int(seed) + int(i))
        out[:, b] = torch.randn(num_timesteps, *sample_shape, generator=g)
    return out


def validation_losses(
    objective: DiffusionLoss | FlowMatchingLoss,
    denoise: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor],
    x0: torch.Tensor,
    cond: object,
    timesteps: Sequence[int],
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per-sample unweighted losses [K, B] (float32) of ``objective``'s target at each of ``timesteps``, with
    ``noise[k]`` (shape [B, ...] like x0) the noise of timestep k; one ``denoise`` call per timestep."""
    if noise.shape[0] != len(timesteps) or noise.shape[1:] != x0.shape:
        raise ValueError(f"noise must have shape [{len(timesteps)}, *x0.shape] = "
                         f"{[len(timesteps), *x0.shape]}, got {list(noise.shape)}")
    B, T = x0.shape[0], objective_timesteps(objective)
    rows = []
    for k, t in enumerate(timesteps):
        eps = noise[k].to(device=x0.device, dtype=x0.dtype)
        if isinstance(objective, FlowMatchingLoss):
            sigma = torch.full((B,), t / T, device=x0.device, dtype=torch.float32)
            rows.append(objective.per_sample_mse(denoise, x0, cond, sigma, eps))
        else:
            tt = torch.full((B,), int(t), device=x0.device, dtype=torch.long)
            rows.append(objective.per_sample_mse(denoise, x0, cond, tt, eps))
    return torch.stack(rows)
