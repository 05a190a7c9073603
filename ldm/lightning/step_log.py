"""A training step's logged values, handed to Lightning only on the steps whose values it writes.

``LightningModule.log`` is not cheap: ``_ResultCollection.log`` moves the stored metric to the value's device by
walking all of its attributes, at every call. A stage logs 6-9 values a step, and Lightning writes
them to its loggers only every ``trainer.log_every_n_steps`` steps and when the run stops; the other steps' values are
overwritten unread. A module adds its step's values to a ``StepLog`` and flushes it at the end of its
``on_train_batch_end``, the last hook before Lightning writes: the values are logged on the steps Lightning writes and
on the last step, so the loggers receive exactly what logging every step would give them.

``trainer.callback_metrics`` then holds the training values of the last written step (and, after ``fit``, of the last
step), not of every step: a callback monitoring a training value (``ModelCheckpoint(monitor="train/loss")``) sees it as
of the last written step. ``StepLog.latest`` holds every step's values for readers that want them (the progress bar).
"""

from __future__ import annotations

import lightning.pytorch as L
import torch


def written_this_step(trainer: L.Trainer) -> bool:
    """Whether this training step's logged values are read: Lightning writes them to its loggers (every
    ``log_every_n_steps`` steps, when the run stops, every step under ``fast_dev_run``), or it is the last step
    (``max_steps``), whose values the stage's closing line reads from ``callback_metrics``. Call it at the end of the
    step, when ``should_stop`` is final: ``trainer.global_step`` then counts this step."""
    if trainer.fast_dev_run:
        return True
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    # Lightning's own test, which its training loop applies right after the module's on_train_batch_end
    # (tests/unit/test_step_log.py checks that the loggers receive what logging every step gives them)
    return bool(trainer._logger_connector.should_update_logs)


class StepLog:
    """The values a training step logs, kept until the step's end and logged there on the steps that are read."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[torch.Tensor, int | None, bool]] = {}
        self.latest: dict[str, torch.Tensor] = {}  # every step's values, as of the last step that added them

    def add(self, name: str, value: torch.Tensor, batch_size: int | None = None, sync_dist: bool = False) -> None:
        """Log ``value`` as ``name`` for this step (``LightningModule.log``'s defaults: on the step, not the epoch).
        Kept detached, as ``log`` keeps it: a loss's autograd graph is not held past its step. ``sync_dist``: the mean
        over the ranks (one all-reduce on the written steps, which every rank flushes alike)."""
        value = value.detach()
        self.pending[name] = (value, batch_size, sync_dist)
        self.latest[name] = value

    def flush(self, module: L.LightningModule) -> None:
        """Log this step's values through ``module.log`` if they are read (``written_this_step``), and start the next
        step empty. Call it last in the module's ``on_train_batch_end``."""
        pending, self.pending = self.pending, {}
        if pending and written_this_step(module.trainer):
            for name, (value, batch_size, sync_dist) in pending.items():
                module.log(name, value, batch_size=batch_size, sync_dist=sync_dist)


def step_log_of(module: L.LightningModule) -> StepLog | None:
    """The module's ``step_log``, or None for a module that logs with ``self.log`` directly."""
    step_log = getattr(module, "step_log", None)
    return step_log if isinstance(step_log, StepLog) else None


def log_step_value(module: L.LightningModule, name: str, value: torch.Tensor, batch_size: int | None = None) -> None:
    """Log a training step's value from a callback: through the module's ``step_log`` where it has one (it flushes at
    its ``on_train_batch_end``, after the callbacks' hooks), else with ``module.log``."""
    step_log = step_log_of(module)
    if step_log is not None:
        step_log.add(name, value, batch_size)
    else:
        module.log(name, value, batch_size=batch_size)
