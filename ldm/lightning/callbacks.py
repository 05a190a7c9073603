"""Training callbacks: checkpoints whose last.ckpt is the final state, throughput (images/s, model FLOP/s and MFU)
and a fixed-prompt sample grid."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from ldm.checkpoint import atomic_write_text
from ldm.errors import ConfigError
from ldm.images import make_grid, to_pil
from ldm.lightning.flops import device_peak_flops, flop_counter_mode
from ldm.lightning.host_reads import host_scalar
from ldm.lightning.preemption import preempted, validation_follows
from ldm.lightning.sharding import is_fsdp
from ldm.lightning.step_log import log_step_value


def steps_this_batch(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended made an optimizer step (False for the batches a gradient accumulation window
    accumulates). Under accumulation ``global_step`` stays at N for the window's first batches, so a test on it
    alone fires there too: after a resume from step N's checkpoint it fires at once, mid-window."""
    return not trainer.fit_loop._should_accumulate()


def save_and_log_grid(trainer: L.Trainer, grid: Image.Image, out_dir: Path, key: str, caption: str) -> None:
    """Save ``grid`` as ``out_dir/{key}_stepNNNNNN.png`` and log it under ``key`` to every logger that takes images."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid.save(out_dir / f"{key}_step{trainer.global_step:06d}.png")
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[grid], step=trainer.global_step, caption=[caption])


class StageCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` always holds the final state.

    Lightning's saves ``last`` at the end of training only if no periodic save happened, so with ``max_steps`` not a
    multiple of ``every_n_train_steps`` it would be left at the last periodic step; here it is rewritten at the end.
    """

    def __init__(self, *args, **kwargs):
        # "step000500.ckpt": no "=" in the name, so `resume=PATH` needs no quoting on Hydra's command line.
        kwargs.setdefault("filename", "step{step:06d}")
        kwargs.setdefault("auto_insert_metric_name", False)
        kwargs.setdefault("enable_version_counter", False)  # last.ckpt is the file written, never last-v1.ckpt
        super().__init__(*args, **kwargs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Lightning's periodic save, at the batches that end an optimizer step only: Lightning's own test (the step
        a multiple of ``every_n_train_steps``, not saved yet) passes on the first batch after a resume under
        gradient accumulation, and it rewrote the checkpoint the run resumed from (and ``last.ckpt``) with a state
        one batch into a window whose gradients it does not hold: a resume from it was no longer exact."""
        if steps_this_batch(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        """Lightning's save after a validation; with a ``monitor``, the best so far is also summarised in
        ``dirpath/best.json`` (monitor, mode, score, checkpoint path), for a sweep to select its best job."""
        super().on_validation_end(trainer, pl_module)
        if self.monitor is None or self.best_model_score is None or not self.best_model_path or self.dirpath is None:
            return
        if trainer.is_global_zero:
            record = {"monitor": self.monitor, "mode": self.mode, "score": float(self.best_model_score),
                      "checkpoint": self.best_model_path}
            atomic_write_text(Path(self.dirpath) / "best.json", json.dumps(record, indent=1) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        if preempted(trainer):  # PreemptionCheckpoint saved last.ckpt at this step
            return
        super().on_train_end(trainer, pl_module)
        # this instance's own last save (Lightning's attribute; each save writes last.ckpt too when save_last). Not
        # on_save_checkpoint, which runs for every callback at any save: another instance's save at the final step
        # (the best checkpoint after the last validation) would pass for this one's
        if self.save_last and self.dirpath is not None and self._last_global_step_saved != trainer.global_step:
            last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(last, weights_only=False)  # the full state: resumable
            self.last_model_path = str(last)


def revalidation_due(trainer: L.Trainer) -> bool:
    """Whether this fit resumed from a checkpoint written at the end of a training batch that a validation followed
    (a periodic ``stepNNNNNN.ckpt`` at a validation step, its ``last.ckpt``, a preemption's ``last.ckpt``): Lightning
    fast-forwards past that validation on a restart, so its loss would be neither logged nor seen by the best
    checkpoint of the resumed run. Checkpoints written after a validation (the best ones, the final ``last.ckpt``)
    are not."""
    loop = trainer.fit_loop.epoch_loop
    return (trainer.ckpt_path is not None and loop.restarting and loop.restarted_on_train_batch_end
            and not loop.val_loop.restarted_mid_evaluation and validation_follows(trainer))


class ResumedValidation(L.Callback):
    """Runs, at the start of a resumed fit, the validation its checkpoint was written before (``revalidation_due``),
    at the step it belongs to: the resumed run logs that step's validation loss and the best checkpoint
    (``StageCheckpoint`` with a ``monitor``) takes it into account, as in an uninterrupted run, whose state it saves
    in ``best-stepNNNNNN.ckpt``. Rows of that validation a stopped run had logged are dropped first
    (``ldm.lightning.loggers.CSVLogger.drop_rows``), so the CSV holds it once. The validation uses its own seeds and
    the EMA weights: the training that follows is the uninterrupted run's, bitwise."""

    def on_train_start(self, trainer, pl_module) -> None:
        if not revalidation_due(trainer):
            return
        loop = trainer.fit_loop.epoch_loop
        step = loop._batches_that_stepped  # Lightning's logging step of that validation (optimizer step - 1)
        rank_zero_info(f"resumed before the validation of step {trainer.global_step}: validating it now")
        for logger in trainer.loggers:
            if hasattr(logger, "drop_rows"):
                logger.drop_rows(step, prefix="val/")
        loop.val_loop.restarting = False  # a whole validation, not the rest of the last one the checkpoint counted
        trainer.validating = True
        first_loop_iter = trainer._logger_connector._first_loop_iter
        loop.val_loop.run()
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter


class RecomputedFlops:
    """The FLOPs of module forwards that run during the backward, i.e. gradient checkpointing's recomputation, as
    ``counter`` counts them: between the first forward pre-hook and its forward hook, every module's (global hooks,
    kept until ``remove``). The forward hook runs even when the recomputation stops early (torch's non-reentrant
    checkpoint stops once it has the tensors it needs), so what ran is what is counted."""

    def __init__(self, counter: FlopCounterMode):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.counter = counter
        self.in_backward = False  # set by the caller from a backward's start to its end
        self.flops = 0
        self._depth, self._mark = 0, 0
        self._handles = [register_module_forward_pre_hook(self._enter),
                         register_module_forward_hook(self._leave, always_call=True)]

    def _enter(self, module, args) -> None:
        if self.in_backward:
            if self._depth == 0:
                self._mark = self.counter.get_total_flops()
            self._depth += 1

    def _leave(self, module, args, output) -> None:
        if self.in_backward and self._depth:
            self._depth -= 1
            if self._depth == 0:
                self.flops += self.counter.get_total_flops() - self._mark

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Throughput(L.Callback):
    """Logs images/s (all ranks), the model FLOP/s achieved per device (``perf/tflops``) and, knowing the device's
    peak FLOP/s, the model FLOP utilisation (``perf/mfu`` = model FLOPs per step / step time / peak). Under gradient
    checkpointing it also logs the hardware FLOP utilisation (``perf/hfu``), which counts the recomputed forward.

    Unless ``flops_per_step`` is given, the FLOPs of one training step's forward and backward (per rank, up to its
    last optimizer step: a module that steps several optimizers a batch says how many in ``optimizer_steps_per_batch``,
    as the GAN VAE does, and is counted again when that number changes, as at ``disc_start``) are counted with
    ``torch.utils.flop_counter.FlopCounterMode`` on the first batch: matmuls,
    convolutions and attention as executed, CPU attention included (``ldm.lightning.flops``). Module forwards that run
    during the backward (checkpointing's recomputation, ``RecomputedFlops``) count for the hardware figure only. The
    counts are saved in checkpoints, so a resumed run does not count again. Logged from the second step of each fit
    on: the first (warm-up, or the count) and a recounting step give no figures.

    ``peak_flops`` (FLOP/s at the training precision) overrides the peak; left None, a bf16 or fp16 run on a GPU in
    ``ldm.lightning.flops.PEAK_BF16_DENSE_FLOPS`` takes that GPU's dense peak (the fp16 and bf16 tensor-core peaks
    are equal on the GPUs listed). Another precision or an unknown GPU gets no MFU, with a warning.
    """

    def __init__(self, flops_per_step: float | None = None, peak_flops: float | None = None):
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self._given = flops_per_step is not None  # a given count is never replaced
        self.hardware_flops_per_step: float | None = flops_per_step  # with the recomputed forward
        self._peak: float | None = peak_flops  # the peak in use: peak_flops, or the device's (on_fit_start)
        self._t0: float | None = None
        self._counter: FlopCounterMode | None = None
        self._recomputed: RecomputedFlops | None = None
        self._counting_step = False
        self._counted_steps = 1  # the optimizer steps a batch of the counted step made (the module's at the time)
        self._warm = False  # past the first step of this fit (allocator, kernels, caches: not a step's time)
        self._optimizer_hooks = 0  # optimizer steps seen while counting

    def on_fit_start(self, trainer, pl_module) -> None:
        """Settle the peak MFU is measured against: the configured one, else the device's."""
        self._peak = self.peak_flops or self._device_peak(trainer)
        self._warm = False  # a resumed fit warms up again

    @staticmethod
    def _device_peak(trainer: L.Trainer) -> float | None:
        """The training device's dense peak for a half-precision run, None (with a warning on a GPU) without one."""
        device = trainer.strategy.root_device
        peak = device_peak_flops(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        if peak is None:
            if device.type == "cuda":
                rank_zero_warn(f"no perf/mfu: the peak FLOP/s of {name!r} is not in ldm.lightning.flops."
                               "PEAK_BF16_DENSE_FLOPS; set perf.peak_flops (the device's peak at the training "
                               "precision)")
            return None
        precision = str(trainer.precision)
        if not precision.startswith(("bf16", "16")):
            rank_zero_warn(f"no perf/mfu: the known peak of {name} ({peak / 1e12:g} TFLOP/s) is for bf16/fp16 tensor "
                           f"cores, this run's precision is {precision}; set perf.peak_flops for it")
            return None
        rank_zero_info(f"perf/mfu against the dense bf16 peak of {name}: {peak / 1e12:g} TFLOP/s")
        return peak

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        steps = int(getattr(pl_module, "optimizer_steps_per_batch", 1))
        recount = not self._given and self.flops_per_step is not None and steps != self._counted_steps
        if (self.flops_per_step is None or recount) and not self._counting_step:
            self._counted_steps, self._optimizer_hooks = steps, 0
            self._counter = flop_counter_mode()
            self._counter.__enter__()
            self._recomputed = RecomputedFlops(self._counter)
            self._counting_step = True
        self._t0 = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._recomputed is not None:
            self._recomputed.in_backward = True

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._recomputed is not None:  # forwards after a backward (a GAN's discriminator) are no recomputation
            self._recomputed.in_backward = False

    def _stop_counting(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._recomputed.remove()
            self.hardware_flops_per_step = float(self._counter.get_total_flops())
            self.flops_per_step = self.hardware_flops_per_step - self._recomputed.flops
            self._counter = self._recomputed = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._optimizer_hooks += 1
        if self._optimizer_hooks >= self._counted_steps:  # the last optimizer step (and the EMA update after it)
            self._stop_counting()  # run outside the counting mode

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dt = time.perf_counter() - self._t0
        n = len(batch["caption"]) if "caption" in batch else next(iter(batch.values())).shape[0]
        if self._counting_step:  # a step slowed by the counting: no figures from it
            self._stop_counting()
            self._counting_step = False
            self._warm = True
            return
        if not self._warm:  # the first step of a fit (a resumed one too) includes its warm-up
            self._warm = True
            return
        log_step_value(pl_module, "perf/images_per_s", host_scalar(n * trainer.world_size / dt), batch_size=n)
        if self.flops_per_step:
            log_step_value(pl_module, "perf/tflops", host_scalar(self.flops_per_step / dt / 1e12), batch_size=n)
            if self._peak:
                log_step_value(pl_module, "perf/mfu", host_scalar(self.flops_per_step / dt / self._peak), batch_size=n)
                if self.hardware_flops_per_step and self.hardware_flops_per_step > self.flops_per_step:
                    log_step_value(pl_module, "perf/hfu",
                                   host_scalar(self.hardware_flops_per_step / dt / self._peak), batch_size=n)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stop_counting()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_counting()

    def state_dict(self) -> dict:
        return {"flops_per_step": self.flops_per_step, "hardware_flops_per_step": self.hardware_flops_per_step,
                "optimizer_steps_per_batch": self._counted_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.flops_per_step is None:
            self.flops_per_step = state_dict.get("flops_per_step")
            self.hardware_flops_per_step = state_dict.get("hardware_flops_per_step", self.flops_per_step)
            self._counted_steps = int(state_dict.get("optimizer_steps_per_batch", 1))


class PeriodicGrid(L.Callback):
    """A grid made every ``every`` optimizer steps and at the end, once per step: drawn at the batch that makes the
    step (under gradient accumulation a step spans several batches, and a run resumed at step N does not draw step
    N's grid again), and a run whose last step is a multiple of ``every`` ends at a step it has drawn."""

    every: int
    _done_step: int | None = None

    def _draw(self, trainer: L.Trainer, pl_module) -> None:
        raise NotImplementedError

    def _draw_once(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self._done_step:
            self._done_step = trainer.global_step
            self._draw(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step % self.every == 0 and step > 0 and steps_this_batch(trainer):
            self._draw_once(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if not preempted(trainer):  # a stopped run saves and leaves: its grid comes at the real end
            self._draw_once(trainer, pl_module)


class SampleGrid(PeriodicGrid):
    """Every ``every_n_steps`` (and at the end) sample fixed prompts with fixed seeds through the module's pipeline
    (its sampling defaults, EMA weights); save and log the grid. Samples that come out NaN or inf (the pipeline
    refuses them) are named in a warning and give no grid: a preview does not stop the training. ``height`` and
    ``width`` (pixels) preview another size than the checkpoint's default, e.g. one of ``data.buckets``'.
    A class-conditional UNet samples prompt i with ``class_labels[i]`` (one label for every prompt, or one per
    prompt; None: class i modulo the number of classes), and the grid's caption names the classes."""

    def __init__(self, prompts: list[str], every_n_steps: int, out_dir: str | Path, seed: int = 0, cols: int = 4,
                 height: int | None = None, width: int | None = None,
                 class_labels: int | Sequence[int] | None = None):
        if not prompts:
            raise ValueError("SampleGrid needs at least one prompt (callbacks.ldm.samples.prompts)")
        self.prompts, self.every, self.out_dir, self.seed = list(prompts), every_n_steps, Path(out_dir), seed
        self.cols = cols
        self.size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
        if isinstance(class_labels, int) and not isinstance(class_labels, bool):
            class_labels = [class_labels] * len(self.prompts)
        elif class_labels is not None:
            class_labels = list(class_labels)
            if len(class_labels) != len(self.prompts):
                raise ValueError(f"SampleGrid got {len(class_labels)} class_labels for {len(self.prompts)} prompts: "
                                 "give one label, or one per prompt (callbacks.ldm.samples.class_labels)")
        self.class_labels = class_labels

    def labels_for(self, num_classes: int | None) -> list[int] | None:
        """The class of each prompt for a UNet of ``num_classes`` classes (None: no classes)."""
        if num_classes is None:
            return None
        return self.class_labels or [i % num_classes for i in range(len(self.prompts))]

    def _draw(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero and not is_fsdp(trainer):  # under FSDP every rank takes part in sampling
            return
        g = torch.Generator().manual_seed(self.seed)
        labels = self.labels_for(getattr(getattr(pl_module, "unet", None), "num_classes", None))
        kwargs = dict(self.size) if labels is None else {**self.size, "class_labels": labels}
        try:
            images = to_pil(pl_module.generate(self.prompts, generator=g, **kwargs))
        except ConfigError as err:  # every rank samples the same prompts, so all of them skip together
            rank_zero_warn(f"no sample grid at step {trainer.global_step}: {err}")
            return
        if trainer.is_global_zero:
            grid = make_grid(images, cols=self.cols)
            captions = self.prompts if labels is None else [
                f"{p} [class {c}]" for p, c in zip(self.prompts, labels, strict=True)]
            save_and_log_grid(trainer, grid, self.out_dir, "samples", " | ".join(captions))


class ReconstructionGrid(PeriodicGrid):
    """Every ``every_n_steps`` (and at the end) reconstruct a fixed set of training images through the autoencoder
    (``pl_module.vae``, posterior mode); save and log a grid: originals on the top row, reconstructions below.

    The set is the first ``n`` images of the first training batch; it is kept in the callback's state, so a resumed
    run keeps showing the same images.
    """

    def __init__(self, every_n_steps: int, out_dir: str | Path, n: int = 8):
        if n < 1:
            raise ValueError(f"ReconstructionGrid needs n >= 1 images, got {n}")
        self.every, self.out_dir, self.n = every_n_steps, Path(out_dir), n
        self.images: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.images is None:
            self.images = batch["image"][: self.n].detach().float().cpu().clone()

    @torch.no_grad()
    def _draw(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or self.images is None:
            return
        vae = pl_module.vae
        was_training = vae.training
        vae.eval()
        x = self.images.to(pl_module.device)
        rec = vae.decode(vae.encode(x).mode())
        vae.train(was_training)
        grid = make_grid(to_pil(torch.cat([x, rec.float()])), cols=len(x))
        save_and_log_grid(trainer, grid, self.out_dir, "reconstructions", "top: input, bottom: reconstruction")

    def state_dict(self) -> dict:
        return {"images": self.images}

    def load_state_dict(self, state_dict: dict) -> None:
        self.images = state_dict.get("images", self.images)
