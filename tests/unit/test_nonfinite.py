"""Which optimizers the on-device non-finite skip trusts, the ranks agreeing on a skipped step in the host mode, and a
preemption signal still being agreed on at the end."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import torch

from ldm.lightning.host_reads import LaggedReads
from ldm.lightning.preemption import PreemptionCheckpoint
from tests.two_ranks import on_two_ranks


def test_an_optimizer_resumed_from_an_unfused_state_is_not_trusted_to_skip_on_the_device():
    """A resumed run builds a fused AdamW and loads a state saved without fusing: torch then runs the groups unfused,
    which refuse found_inf, so the non-finite test must stay on the host."""
    from ldm.lightning.nonfinite import skips_on_device

    params = [torch.nn.Parameter(torch.ones(2))]
    unfused = torch.optim.AdamW(params, fused=None)
    fused = torch.optim.AdamW(params, fused=True)
    assert skips_on_device(fused, precision_plugin=None)
    fused.load_state_dict(unfused.state_dict())
    assert not skips_on_device(fused, precision_plugin=None)
    assert not skips_on_device(torch.optim.AdamW(params, fused=True), precision_plugin=type("P", (), {"scaler": 1}))
    # parameters elsewhere than the training device (FSDP's CPU offload): the test's result would not be there
    assert skips_on_device(torch.optim.AdamW(params, fused=True), None, torch.device("cpu"))
    assert not skips_on_device(torch.optim.AdamW(params, fused=True), None, torch.device("meta"))


def test_a_signal_agreed_on_in_the_last_steps_still_saves_and_stops(tmp_path):
    """Under DDP on GPUs the agreed signal is read two steps late; one pushed in the last two steps is read when
    training ends (or a validation starts), and the run saves last.ckpt and reports the signal."""
    saved = []
    trainer = SimpleNamespace(checkpoint_callback=None, checkpoint_callbacks=[], default_root_dir=str(tmp_path),
                              global_step=7, should_stop=False,
                              save_checkpoint=lambda path, weights_only=False: saved.append(str(path)))
    callback = PreemptionCheckpoint()
    callback._agreed = LaggedReads(2)
    callback._agreed.push(6, torch.tensor(float(signal.SIGUSR1)))
    assert callback._agreed.due(7) == []  # not yet due at the last step
    callback.on_train_end(trainer, None)
    assert callback.stopped_by == signal.SIGUSR1 and trainer.should_stop
    assert saved == [str(tmp_path / "checkpoints" / "last.ckpt")] == [callback.checkpoint]


def test_in_one_process_a_signal_after_the_last_check_still_saves_and_stops(tmp_path):
    """With check_every_n_steps > 1 (or a signal during the last step's end) no step-end check sees it: training's
    end does, so the run saves last.ckpt and stops instead of going on to the next stage unrequeued."""
    saved = []
    trainer = SimpleNamespace(checkpoint_callback=None, checkpoint_callbacks=[], default_root_dir=str(tmp_path),
                              global_step=5, should_stop=False, world_size=1,
                              save_checkpoint=lambda path, weights_only=False: saved.append(str(path)))
    callback = PreemptionCheckpoint(check_every_n_steps=3)
    callback.on_train_end(trainer, None)
    assert callback.stopped_by is None and not saved  # no signal: nothing
    callback.recorder.handle(signal.SIGTERM, None)  # at step 4 of 5: step 5 is not a check
    callback.on_train_end(trainer, None)
    assert callback.stopped_by == signal.SIGTERM and trainer.should_stop
    assert saved == [str(tmp_path / "checkpoints" / "last.ckpt")] == [callback.checkpoint]


def _host_mode_rank(rank: int) -> tuple[list[bool], int]:
    """Rank 1's loss is NaN at step 3: what each step's check said, and the count of skipped steps."""
    from ldm.lightning.nonfinite import NaNPolicy, NonFiniteSteps

    steps = NonFiniteSteps(NaNPolicy("skip", max_skips=5))
    steps.start(on_device=False, device=torch.device("cpu"))
    said = [steps.loss_is_finite(torch.tensor(float("nan") if (rank, step) == (1, 3) else 0.5), step)
            for step in range(5)]
    return said, steps.skipped


def test_a_non_finite_loss_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """The host-mode test (fp16, or an unfused optimizer) under DDP: a rank that alone skipped its backward would
    leave the other waiting in the gradient all-reduce; every rank skips the step and counts it."""
    expected = ([True, True, True, False, True], 1)
    assert on_two_ranks(_host_mode_rank, tmp_path / "store") == {0: expected, 1: expected}


def test_a_signal_within_a_gradient_accumulation_window_saves_at_its_end(tmp_path):
    """With accumulate_grad_batches=2, a signal that arrives at the first batch of a window stops the run after the
    window's optimizer step: a checkpoint saved between its two batches would lose the first one's gradients."""
    import lightning as L
    from torch.utils.data import DataLoader

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

        def training_step(self, batch, batch_idx):
            return (self.w - batch).square().sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    preemption = PreemptionCheckpoint()

    class Signal(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:  # the first batch of the second window
                preemption.recorder.handle(signal.SIGUSR1, None)

    trainer = L.Trainer(max_steps=10, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Signal(), preemption])
    trainer.fit(Tiny(), DataLoader(torch.ones(40, 2), batch_size=2))
    assert preemption.stopped_by == signal.SIGUSR1 and trainer.global_step == 2
    saved = torch.load(preemption.checkpoint, map_location="cpu", weights_only=False)
    batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert saved["global_step"] == 2 and batches == 4  # saved after the window's second batch, not between them
