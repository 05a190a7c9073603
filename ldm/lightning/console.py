"""A quiet, helpful console for training runs: a headline per stage with what it trains, one progress bar, and no
warnings a user cannot act on. Those are filtered narrowly, by message and category or logger, never globally."""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from ldm.lightning.step_log import step_log_of

_TIP = "💡 Tip:"


class _DropTips(logging.Filter):
    """Drops Lightning's product tips (litlogger, litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP)


def quiet_known_warnings() -> None:
    """Filter what says nothing actionable about an ldm run; call once per process, before training."""
    # The frozen first stage and guide snapshot are in eval mode on purpose (LatentDiffusionModule.train keeps them so).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training",
                            category=PossibleUserWarning)
    # ShardDataModule always defines val_dataloader (empty without data.val_shards); the modules have no val step.
    warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
    # The VAE stage steps by hand; its periodic checkpoint at step N holds the state after N steps, which exact
    # resume needs. Lightning's advice to save the state before the optimizer step does not apply.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
    # Lightning's own pytree helper calls an API that torch deprecated; nothing in ldm calls it.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar without the logger's version number (``v_num``), which says nothing here, showing the
    module's ``progress_bar_keys`` as of its last step.

    Those are read when the bar refreshes (``trainer.progress_bar_refresh_steps``), not logged with ``prog_bar=True``:
    Lightning converts a ``prog_bar`` value to a number after every step, and on a GPU that read waits for the
    step's queued work. A module with a ``step_log`` (``ldm.lightning.step_log``) shows its latest step's values,
    which it logs only on the steps Lightning writes; another module's come from ``callback_metrics``.
    """

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        step_log = step_log_of(pl_module)
        latest = step_log.latest if step_log is not None else {}
        for key in getattr(pl_module, "progress_bar_keys", ()):
            value = latest.get(key, trainer.callback_metrics.get(key))
            if value is not None:
                metrics[key] = float(value)
        return metrics


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.0f} K"


def parts_summary(module: nn.Module) -> str:
    """One line of the module's parts: their classes and sizes, and which are frozen or only partly trained."""
    items = []
    for name, child in module.named_children():
        total = sum(p.numel() for p in child.parameters())
        if not total:
            continue
        trained = sum(p.numel() for p in child.parameters() if p.requires_grad)
        note = " (frozen)" if not trained else "" if trained == total else f" ({_size(trained)} trained)"
        items.append(f"{name} {type(child).__name__} {_size(total)}{note}")
    return ", ".join(items)


def headline(text: str) -> None:
    """One line that opens a stage of the run."""
    rank_zero_info(f"\n==> {text}")
