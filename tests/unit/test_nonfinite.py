"""Which optimizers the on-device non-finite skip trusts, and a preemption signal still being agreed on at the end."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import torch

from ldm.lightning.host_reads import LaggedReads
from ldm.lightning.preemption import PreemptionCheckpoint


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
