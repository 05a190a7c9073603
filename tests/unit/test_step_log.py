"""ldm.lightning.step_log: a step's training values reach the loggers exactly as logging every step gives them
(Lightning's own behaviour is the oracle), through far fewer ``LightningModule.log`` calls; the progress bar shows
the latest step's values; the LDM and VAE stages log through it."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from ldm.autoencoder import AutoencoderKL
from ldm.lightning.autoencoder_module import AutoencoderModule
from ldm.lightning.callbacks import Throughput
from ldm.lightning.console import StepProgressBar
from ldm.lightning.step_log import StepLog, log_step_value
from ldm.text import ScratchTextEncoder
from tests.module_factory import diffusion_module
from tests.unit.test_lightning_modules import collate, image_batches, tiny_unet


class _Regression(L.LightningModule):
    """A linear model whose step logs a tensor, a host number and (from a callback) a third value, either through
    ``self.log`` at every step (Lightning's behaviour, the reference) or through a ``StepLog``."""

    progress_bar_keys = ("train/loss",)

    def __init__(self, step_log: bool):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        if step_log:
            self.step_log = StepLog()
        self.losses: list[float] = []

    def _log(self, name, value, batch_size):
        if hasattr(self, "step_log"):
            self.step_log.add(name, value, batch_size)
        else:
            self.log(name, value, batch_size=batch_size)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.net(x).squeeze(-1) - y).square().mean()
        self.losses.append(float(loss.detach()))
        self._log("train/loss", loss, x.shape[0])
        self._log("train/step_squared", torch.tensor(float(self.global_step) ** 2), x.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if hasattr(self, "step_log"):
            self.step_log.flush(self)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _FromCallback(L.Callback):
    """Logs a value from a callback's on_train_batch_end, as Throughput does; optionally stops the run at a step
    that is not a logging step, as a preemption does."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        log_step_value(pl_module, "perf/batch_index", torch.tensor(float(batch_idx)), batch_size=1)
        if self.stop_at is not None and trainer.global_step == self.stop_at:
            trainer.should_stop = True


def _fit(tmp_path, step_log: bool, max_steps: int, stop_at: int | None, every: int):
    torch.manual_seed(1)
    data = [(torch.randn(8, 4), torch.randn(8)) for _ in range(32)]
    module = _Regression(step_log)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, log_every_n_steps=every, callbacks=[_FromCallback(stop_at)],
        logger=CSVLogger(tmp_path, name="run", version=int(step_log)), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return trainer, module, rows


def _counting_log(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = LightningModule.log

    def counted(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(LightningModule, "log", counted)
    return calls


@pytest.mark.parametrize(("max_steps", "stop_at", "every"), [
    (20, None, 3),   # the last step (20) is not a logging step
    (20, 7, 3),      # stopped at step 7 by a callback, not a logging step either
    (12, None, 4),
    (5, None, 1),    # every step written
])
def test_the_loggers_receive_what_logging_every_step_gives_them(tmp_path, monkeypatch, max_steps, stop_at, every):
    reference, ref_module, ref_rows = _fit(tmp_path, False, max_steps, stop_at, every)
    calls = _counting_log(monkeypatch)
    trainer, module, rows = _fit(tmp_path, True, max_steps, stop_at, every)

    assert module.losses == ref_module.losses  # the same run
    assert rows == ref_rows and len(rows) >= 1  # the same steps written, with the same values
    steps = len(module.losses)
    written = {s for s in range(1, steps + 1) if s % every == 0} | {steps}  # Lightning's, and the last step
    assert len(calls) == 3 * len(written)
    if every > 1:
        assert len(calls) < 3 * steps
    # after fit the values of the last step, as with logging every step
    assert {k: float(v) for k, v in trainer.callback_metrics.items()} == {
        k: float(v) for k, v in reference.callback_metrics.items()}
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(module.losses[-1])


def test_the_progress_bar_shows_the_steps_own_values(tmp_path):
    """The bar reads the step log's latest values: this step's loss, though it is logged on written steps only."""
    shown: list[float] = []

    class Reader(L.Callback):
        def __init__(self, bar):
            self.bar = bar

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            shown.append(self.bar.get_metrics(trainer, pl_module)["train/loss"])

    bar, module = StepProgressBar(refresh_rate=1), _Regression(step_log=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, log_every_n_steps=4, callbacks=[bar, Reader(bar)],
                        logger=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    data = [(torch.randn(8, 4), torch.randn(8)) for _ in range(6)]
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    assert shown == pytest.approx(module.losses)
    assert not module.step_log.latest["train/loss"].requires_grad  # no autograd graph kept past its step


def test_the_stages_log_on_the_written_steps_only(tmp_path, monkeypatch):
    """The LDM module (with the Throughput callback's values) and the VAE module: their training values go through
    ``LightningModule.log`` on Lightning's logging steps and the last step only, and the last step's are in
    callback_metrics after fit."""
    calls = _counting_log(monkeypatch)
    torch.manual_seed(0)
    unet, text = tiny_unet(in_ch=3), ScratchTextEncoder(width=32, layers=1, heads=2, context_length=8)
    ldm = diffusion_module(unet, text, None, ema_decay=None)
    trainer = L.Trainer(max_steps=5, log_every_n_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Throughput()])
    trainer.fit(ldm, torch.utils.data.DataLoader(image_batches(20), batch_size=4, collate_fn=collate))
    # steps 2, 4 (Lightning's) and 5 (the last); Throughput's FLOP/s from step 2 on (the first step counts FLOPs)
    assert calls.count("train/loss") == 3 and calls.count("train/grad_norm") == 3
    assert calls.count("perf/images_per_s") == 3 and calls.count("perf/tflops") == 3
    assert {"train/loss", "train/lr", "train/nan_skips", "train/grad_norm"} <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics["train/loss"]) == float(ldm.step_log.latest["train/loss"])

    calls.clear()
    torch.manual_seed(0)
    vae = AutoencoderModule(AutoencoderKL(in_channels=3, out_channels=3, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                                          z_channels=4, embed_dim=4), lr=1e-3, max_steps=5)
    images = [{"image": torch.rand(2, 3, 16, 16) * 2 - 1} for _ in range(5)]
    trainer = L.Trainer(max_steps=5, log_every_n_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(vae, torch.utils.data.DataLoader(images, batch_size=None))
    assert calls.count("train/loss") == 3 and calls.count("train/psnr") == 3 and calls.count("train/kl") == 3
    assert float(trainer.callback_metrics["train/psnr"]) == float(vae.step_log.latest["train/psnr"])
