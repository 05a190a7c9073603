"""What a training step with a non-finite loss or gradient does: stop the run, or skip the step and count it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ldm.lightning.host_reads import LaggedReads
from ldm.lightning.sharding import all_ranks

READ_LAG_STEPS = 2  # the count is read this many steps late: the host never waits for the GPU's queue
LDM_HINT = ("Lower the learning rate, use bf16 rather than fp16, or set ldm_stage.nan_policy=skip (with "
            "ldm_stage.max_nan_skips) to skip such batches.")


@dataclass(frozen=True)
class NaNPolicy:
    """What a non-finite loss does: ``stop`` the run, or ``skip`` the batch (at most ``max_skips`` times)."""

    policy: str = "stop"
    max_skips: int = 10

    def __post_init__(self) -> None:
        if self.policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {self.policy!r}")


def skips_on_device(optimizer: torch.optim.Optimizer, precision_plugin: object,
                    device: torch.device | None = None) -> bool:
    """Whether ``optimizer`` can skip a step on the device: a fused torch optimizer (it takes ``found_inf``, as
    under a gradient scaler), with no gradient scaler of its own (fp16's scaler sets ``found_inf`` itself), whose
    parameters are all on ``device`` (the test's result lives there; FSDP's CPU offload would read it unsynced)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
    # every group: a state dict loaded on resume replaces the groups, and one saved without fusing runs unfused
    fused = getattr(inner, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in inner.param_groups)
    same_device = device is None or all(p.device.type == torch.device(device).type
                                        for g in inner.param_groups for p in g["params"])
    return bool(fused) and same_device and getattr(precision_plugin, "scaler", None) is None


class NonFiniteSteps:
    """Applies a ``NaNPolicy`` to the training steps, on the device when the optimizer allows it.

    - **On the device** (a fused optimizer; ``skips_on_device``): before each optimizer step the gradient norm is
      tested on the device and handed to the fused kernel as ``found_inf``, which then leaves the weights and the
      optimizer state as they were. The running count of skipped steps stays on the device and is read
      ``READ_LAG_STEPS`` steps later (``LaggedReads``), so the step never waits for the GPU. The test is on the
      gradients after the DDP all-reduce (FSDP: the global norm), so every rank skips the same steps; it also
      catches a finite loss with an infinite gradient.
    - **On the host** (any other optimizer, or fp16 with its scaler): the loss is tested on the host (and agreed
      over the ranks), and a non-finite one is not backpropagated (the training step returns None). Lightning
      refuses None on several ranks: there the backward runs and the module drops the update after it.

    ``stop`` raises ``FloatingPointError`` at the first skipped step (on the device: when its count is read, up to
    ``READ_LAG_STEPS`` steps later; the skipped step left the weights intact), ``skip`` after ``max_skips``. The
    error ends with ``hint``: what the user can change.
    """

    def __init__(self, policy: NaNPolicy, skipped: int = 0, hint: str = LDM_HINT):
        self.policy = policy
        self.hint = hint
        self.skipped = skipped  # known on the host
        self.on_device = False
        self._total: torch.Tensor | None = None  # the running count on the device
        self._reads = LaggedReads(READ_LAG_STEPS)

    def start(self, on_device: bool, device: torch.device) -> None:
        """Choose the mode for a fit (``skips_on_device``) and start the device count from ``skipped``."""
        self.on_device = on_device
        self._total = torch.tensor(float(self.skipped), device=device) if on_device else None
        self._reads = LaggedReads(READ_LAG_STEPS)

    def loss_is_finite(self, loss: torch.Tensor, step: int) -> bool:
        """The host mode's test (always True on the device, where the gradients are tested instead): counts a
        non-finite loss, raising when the policy says stop. With several ranks, a non-finite loss on any of them
        counts on all: a rank that skipped its backward alone would leave the others waiting in the gradient
        all-reduce."""
        if self.on_device:
            return True
        bad = (~torch.isfinite(loss.detach())).to(torch.float32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            bad = all_ranks(bad, "max")
        if not bad:
            return True
        what = f"loss is {loss.item()}" if not torch.isfinite(loss) else "another rank's loss is not finite"
        self._note(self.skipped + 1, step, what)
        return False

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, norm: torch.Tensor | None, step: int) -> None:
        """The device mode: mark a step with a non-finite gradient ``norm`` for the fused optimizer to skip, and act
        on the counts that are due."""
        if not self.on_device:
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        if norm is None:  # no gradients at all: nothing to skip
            inner.__dict__.pop("found_inf", None)
        else:
            found = (~torch.isfinite(norm)).to(torch.float32)
            inner.found_inf = found
            self._total += found
            self._reads.push(step, self._total)
        self._act(self._reads.due(step))

    def flush(self) -> None:
        """Read every pending count now (end of training, a checkpoint) and act on it."""
        self._act(self._reads.drain())

    def finish(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """The end of training: ``flush``, and take the device test's ``found_inf`` off ``optimizers`` (a later
        step outside this class would otherwise be skipped by a stale flag)."""
        self.flush()
        for optimizer in optimizers:
            getattr(optimizer, "optimizer", optimizer).__dict__.pop("found_inf", None)

    def _act(self, reads: list[tuple[int, float]]) -> None:
        for step, total in reads:
            if int(total) > self.skipped:
                self._note(int(total), step, "the gradients are not finite")

    def _note(self, skipped: int, step: int, what: str) -> None:
        self.skipped = skipped
        if self.policy.policy == "stop" or self.skipped > self.policy.max_skips:
            raise FloatingPointError(
                f"{what} at step {step} (skipped so far: {self.skipped - 1}). That step did not change the weights "
                f"and the last checkpoint is kept. {self.hint}"
            )
