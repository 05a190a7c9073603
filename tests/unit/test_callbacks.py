"""Training callbacks: the FLOP count behind perf/tflops and perf/mfu, a last.ckpt that is the final state, and the
autoencoder's reconstruction grid, and a sample grid that skips NaN samples."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ldm.autoencoder import AutoencoderKL
from ldm.errors import ConfigError
from ldm.lightning import callbacks
from ldm.lightning.autoencoder_module import AutoencoderModule
from ldm.lightning.callbacks import ReconstructionGrid, SampleGrid, StageCheckpoint, Throughput
from ldm.lightning.checkpoint_io import AtomicCheckpointIO
from ldm.pipeline import to_pil

B, N_IN, N_HID, N_OUT = 4, 16, 32, 8


class TwoLayers(L.LightningModule):
    def __init__(self, checkpointed: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_IN, N_HID), nn.ReLU(), nn.Linear(N_HID, N_OUT))
        self.checkpointed = checkpointed  # the first layer and its ReLU recomputed in the backward

    def training_step(self, batch, batch_idx):
        if self.checkpointed:
            # (the ReLU's saved output needs the layer's matmul again; the layer alone would recompute nothing:
            # its backward needs only the input and the weight, and torch's recomputation stops once it has those)
            h = torch.utils.checkpoint.checkpoint(self.net[:2], batch["x"], use_reentrant=False)
            return self.net[2](h).square().mean()
        return self.net(batch["x"]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, callbacks, steps: int = 3, precision: str = "32-true", checkpointed: bool = False) -> L.Trainer:
    data = [{"x": torch.randn(B, N_IN)} for _ in range(steps)]
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
        enable_checkpointing=any(isinstance(c, StageCheckpoint) for c in callbacks), precision=precision,
    )
    trainer.fit(TwoLayers(checkpointed), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return trainer


@pytest.fixture
def step_time(monkeypatch) -> float:
    """The callback's clock advances by this many seconds a reading: every step takes exactly that long."""
    dt, clock = 0.25, iter(range(10**6))
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=lambda: next(clock) * dt))
    return dt


def test_throughput_counts_forward_and_backward_flops_and_logs_mfu(tmp_path, step_time):
    throughput = Throughput(peak_flops=1e9)
    trainer = fit(tmp_path, [throughput])
    forward = 2 * B * (N_IN * N_HID + N_HID * N_OUT)
    # the weight gradients of both layers, and the input gradient of the second (x needs none)
    backward = 2 * B * (N_IN * N_HID + N_HID * N_OUT) + 2 * B * N_HID * N_OUT
    assert throughput.flops_per_step == forward + backward
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["perf/tflops"] == pytest.approx((forward + backward) / step_time / 1e12, rel=1e-6)
    assert metrics["perf/mfu"] == pytest.approx((forward + backward) / step_time / 1e9, rel=1e-6)
    assert metrics["perf/images_per_s"] == pytest.approx(B / step_time, rel=1e-6)


def test_throughput_counts_checkpointings_recomputed_forward_for_the_hardware_figure_only(tmp_path, step_time):
    plain, recomputing = Throughput(peak_flops=1e9), Throughput(peak_flops=1e9)
    assert "perf/hfu" not in fit(tmp_path, [plain]).callback_metrics
    trainer = fit(tmp_path, [recomputing], checkpointed=True)
    first_layer = 2 * B * N_IN * N_HID  # its forward, run again in the backward
    assert recomputing.flops_per_step == plain.flops_per_step == plain.hardware_flops_per_step
    assert recomputing.hardware_flops_per_step == plain.flops_per_step + first_layer
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["perf/mfu"] == pytest.approx(plain.flops_per_step / step_time / 1e9, rel=1e-6)
    assert metrics["perf/hfu"] == pytest.approx((plain.flops_per_step + first_layer) / step_time / 1e9, rel=1e-6)
    resumed = Throughput()
    resumed.load_state_dict(recomputing.state_dict())
    assert (resumed.flops_per_step, resumed.hardware_flops_per_step) == (plain.flops_per_step,
                                                                         recomputing.hardware_flops_per_step)


def test_throughput_counts_the_unets_model_flops_with_gradient_checkpointing(tmp_path):
    """The real UNet's checkpointed blocks (torch's non-reentrant checkpoint, which may stop a recomputation early):
    the model count equals the count without checkpointing, and the hardware count adds the recomputed forward."""
    from ldm.text import ScratchTextEncoder
    from tests.module_factory import diffusion_module
    from tests.unit.test_lightning_modules import collate, image_batches, tiny_unet

    counts = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        unet, text = tiny_unet(in_ch=3), ScratchTextEncoder(width=32, layers=1, heads=2, context_length=8)
        unet.gradient_checkpointing = checkpointing
        throughput = Throughput()
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path, callbacks=[throughput]).fit(
            diffusion_module(unet, text, None, ema_decay=None),
            torch.utils.data.DataLoader(image_batches(4), batch_size=4, collate_fn=collate))
        counts[checkpointing] = throughput.flops_per_step, throughput.hardware_flops_per_step
    (plain, plain_hw), (model, hardware) = counts[False], counts[True]
    assert plain == plain_hw and model == pytest.approx(plain, rel=1e-9)
    assert hardware > model * 1.2


def test_throughput_takes_the_device_peak_for_half_precision_runs_only(tmp_path, monkeypatch, step_time):
    monkeypatch.setattr(callbacks, "device_peak_flops", lambda device=None: 2e9)  # as on a GPU of the table
    auto = Throughput()
    trainer = fit(tmp_path, [auto], precision="bf16-mixed")
    assert float(trainer.callback_metrics["perf/mfu"]) == pytest.approx(auto.flops_per_step / step_time / 2e9, rel=1e-6)
    configured = Throughput(peak_flops=1e9)  # a configured peak wins over the device's
    trainer = fit(tmp_path, [configured], precision="bf16-mixed")
    assert float(trainer.callback_metrics["perf/mfu"]) == pytest.approx(configured.flops_per_step / step_time / 1e9,
                                                                        rel=1e-6)
    with pytest.warns(UserWarning, match="precision is 32-true"):  # a bf16 peak says nothing of an fp32 run
        trainer = fit(tmp_path, [Throughput()])
    assert "perf/tflops" in trainer.callback_metrics and "perf/mfu" not in trainer.callback_metrics


def test_throughput_without_a_peak_logs_no_mfu_and_given_flops_are_not_recounted(tmp_path):
    trainer = fit(tmp_path, [Throughput()])
    assert "perf/tflops" in trainer.callback_metrics and "perf/mfu" not in trainer.callback_metrics
    given = Throughput(flops_per_step=123.0, peak_flops=1e3)
    fit(tmp_path, [given])
    assert given.flops_per_step == 123.0
    resumed = Throughput()  # a resumed run takes the count from the checkpoint instead of counting again
    resumed.load_state_dict(given.state_dict())
    assert resumed.flops_per_step == 123.0


def test_stage_checkpoint_last_is_the_final_step(tmp_path):
    fit(tmp_path, [StageCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)], steps=5)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5  # Lightning's ModelCheckpoint would leave it at step 4, the last periodic save
    assert torch.load(tmp_path / "ckpt" / "step000004.ckpt", weights_only=False)["global_step"] == 4
    # another checkpoint callback saving at the final step (as the best one does after the last validation)
    fit(tmp_path, [StageCheckpoint(dirpath=tmp_path / "two", save_last=True, every_n_train_steps=2),
                   StageCheckpoint(dirpath=tmp_path / "two", filename="other-{step}", every_n_train_steps=5)],
        steps=5)
    assert torch.load(tmp_path / "two" / "last.ckpt", weights_only=False)["global_step"] == 5


def test_reconstruction_grid_shows_fixed_inputs_over_their_reconstructions(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4,
                        embed_dim=4)
    batches = [{"image": torch.rand(6, 3, 16, 16) * 2 - 1} for _ in range(3)]
    grid_cb = ReconstructionGrid(every_n_steps=2, out_dir=tmp_path / "samples", n=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, callbacks=[grid_cb], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(AutoencoderModule(vae, lr=1e-3), train_dataloaders=loader)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "reconstructions_step000002.png", "reconstructions_step000003.png"]  # every 2 steps and at the end
    grid = np.asarray(Image.open(tmp_path / "samples" / "reconstructions_step000003.png"))
    assert grid.shape == (2 * 16, 4 * 16, 3)
    inputs = np.concatenate([np.asarray(im) for im in to_pil(batches[0]["image"][:4])], axis=1)
    np.testing.assert_array_equal(grid[:16], inputs)  # the top row is the first batch's first 4 images
    vae.eval()
    with torch.no_grad():
        rec = vae.decode(vae.encode(batches[0]["image"][:4]).mode())
    expected = np.concatenate([np.asarray(im) for im in to_pil(rec)], axis=1)
    assert np.abs(grid[16:].astype(int) - expected).max() <= 1  # the bottom row: the final weights' reconstructions
    resumed = ReconstructionGrid(every_n_steps=2, out_dir=tmp_path / "again")
    resumed.load_state_dict(grid_cb.state_dict())
    assert torch.equal(resumed.images, batches[0]["image"][:4])  # a resumed run shows the same images
    with pytest.raises(ValueError, match="n >= 1"):
        ReconstructionGrid(every_n_steps=2, out_dir=tmp_path, n=0)


class Previewed(TwoLayers):
    """TwoLayers with a generate() that gives plain images, or fails as the pipeline does on NaN samples."""

    def __init__(self, nan_at: int):
        super().__init__()
        self.nan_at = nan_at

    def generate(self, prompts, generator=None):
        if self.trainer.global_step == self.nan_at:
            raise ConfigError("sampling produced NaN or inf latents (guidance_scale=7.5, ...)")
        return torch.zeros(len(prompts), 3, 8, 8)


def test_sample_grid_skips_nan_samples_with_a_warning_and_training_goes_on(tmp_path):
    grid = SampleGrid(["a", "b"], every_n_steps=1, out_dir=tmp_path / "samples")
    data = [{"x": torch.randn(B, N_IN)} for _ in range(3)]
    trainer = L.Trainer(accelerator="cpu", max_steps=3, callbacks=[grid], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="no sample grid at step 2: sampling produced NaN"):
        trainer.fit(Previewed(nan_at=2), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert trainer.global_step == 3
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "samples_step000001.png", "samples_step000003.png"]  # step 2's grid skipped, the final one written


class CountedPreview(TwoLayers):
    """TwoLayers whose generate() records the step it sampled at."""

    def __init__(self):
        super().__init__()
        self.steps: list[int] = []

    def generate(self, prompts, generator=None):
        self.steps.append(self.trainer.global_step)
        return torch.zeros(len(prompts), 3, 8, 8)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_sample_grid_samples_once_per_step_under_accumulation_and_at_a_last_multiple(tmp_path, accumulate):
    """Every 2 optimizer steps of 4, and at the end: steps 2 and 4 once each, whatever batches end a step."""
    module = CountedPreview()
    grid = SampleGrid(["a"], every_n_steps=2, out_dir=tmp_path / "samples")
    data = [{"x": torch.randn(B, N_IN)} for _ in range(4 * accumulate)]
    trainer = L.Trainer(accelerator="cpu", max_steps=4, callbacks=[grid], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        accumulate_grad_batches=accumulate)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert trainer.global_step == 4 and module.steps == [2, 4]


def accumulating_fit(tmp_path, module: L.LightningModule, callbacks: list, resume: Path | None = None) -> L.Trainer:
    """Four optimizer steps of 2 accumulated batches each (resumed from ``resume``), checkpoints in ``tmp_path``."""
    data = [{"x": torch.randn(B, N_IN)} for _ in range(8)]
    trainer = L.Trainer(accelerator="cpu", max_steps=4, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accumulate_grad_batches=2,
                        plugins=[AtomicCheckpointIO()],
                        enable_checkpointing=any(isinstance(c, StageCheckpoint) for c in callbacks))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None), ckpt_path=resume)
    return trainer


def test_a_run_resumed_under_accumulation_keeps_the_checkpoint_it_resumed_from(tmp_path):
    """Lightning's periodic test passed on the first batch after a resume at step 2 (global_step still 2, nothing
    saved yet by this fit): step000002.ckpt and last.ckpt were rewritten one batch into the window, without its
    gradients, and a resume from them was not exact."""
    def checkpoint() -> StageCheckpoint:
        return StageCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=-1)

    accumulating_fit(tmp_path, TwoLayers(), [checkpoint()])
    saved = tmp_path / "ckpt" / "step000002.ckpt"

    def batches_done() -> int:
        return torch.load(saved, weights_only=False)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"][
            "completed"]

    before = batches_done()
    trainer = accumulating_fit(tmp_path, TwoLayers(), [checkpoint()], resume=saved)
    assert trainer.global_step == 4 and batches_done() == before  # the resumed-from state, as it was written


def test_a_run_resumed_under_accumulation_does_not_draw_the_resumed_steps_grid_again(tmp_path):
    checkpoint = StageCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    accumulating_fit(tmp_path, CountedPreview(), [checkpoint])
    module = CountedPreview()
    grid = SampleGrid(["a"], every_n_steps=2, out_dir=tmp_path / "samples")
    accumulating_fit(tmp_path, module, [grid], resume=tmp_path / "ckpt" / "step000002.ckpt")
    assert module.steps == [4]  # step 2's grid belongs to the run that made step 2


def test_a_run_resumed_under_accumulation_does_not_evaluate_the_resumed_step_again(tmp_path, monkeypatch):
    """The Evaluation (FID) callback tested the step count alone: resumed at step 2 under accumulation, it generated
    and measured step 2 again on the first batch (hours of sampling at a large n)."""
    from ldm.lightning.evaluation import Evaluation

    evaluated: list[int] = []
    monkeypatch.setattr(Evaluation, "evaluate", lambda self, trainer, module: evaluated.append(trainer.global_step))
    monkeypatch.setattr(Evaluation, "setup", lambda self, trainer, module, stage: None)  # its file checks
    checkpoint = StageCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    accumulating_fit(tmp_path, TwoLayers(), [checkpoint])
    evaluation = Evaluation(captions=["a"])
    evaluation.enabled, evaluation.every = True, 2  # the measuring itself is patched out: no statistics needed
    accumulating_fit(tmp_path, TwoLayers(), [evaluation], resume=tmp_path / "ckpt" / "step000002.ckpt")
    assert evaluated[0] == 4  # step 2's belongs to the run that made step 2 (step 4's: at the batch, then at the end)


class SizedPreview(TwoLayers):
    """TwoLayers whose generate() records the size it was asked for."""

    def __init__(self):
        super().__init__()
        self.asked: list[dict] = []

    def generate(self, prompts, generator=None, **size):
        self.asked.append(size)
        return torch.zeros(len(prompts), 3, size.get("height", 8), size.get("width", 8))


def test_sample_grid_previews_the_size_it_is_given(tmp_path):
    module = SizedPreview()
    grid = SampleGrid(["a"], every_n_steps=0, out_dir=tmp_path / "samples", height=16, width=32)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, callbacks=[grid], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([{"x": torch.randn(B, N_IN)}], batch_size=None))
    assert module.asked == [{"height": 16, "width": 32}]
    from PIL import Image

    with Image.open(next((tmp_path / "samples").iterdir())) as image:
        assert image.size[0] >= 32 and image.size[1] >= 16 and image.size[0] > image.size[1]


def test_throughput_stops_its_clock_before_the_grids_draw(tmp_path):
    """The default config lists the sample and reconstruction grids before Throughput; Lightning runs batch-end
    hooks in list order, so a grid's drawing counted as step time on every logged grid step. The stage's callbacks
    put Throughput first and keep the others' order."""
    from hydra import compose, initialize_config_dir

    from ldm.lightning.callbacks import SampleGrid, Throughput
    from ldm.lightning.stages import make_callbacks

    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["logger=csv", f"out_dir={tmp_path}"])
    names = list(cfg.callbacks.ldm)
    assert names.index("samples") < names.index("throughput")  # the config's order, which the sort must undo
    callbacks = make_callbacks(cfg.callbacks.ldm)
    assert isinstance(callbacks[0], Throughput)
    assert [type(c) for c in callbacks[1:]] == [type(c) for c in make_callbacks(cfg.callbacks.ldm)
                                                if not isinstance(c, Throughput)]
    assert any(isinstance(c, SampleGrid) for c in callbacks)


def test_throughput_gives_no_figures_for_the_first_step_of_a_fit(tmp_path, monkeypatch, step_time):
    """A given or restored FLOP count skips the counting step, but the first step of a fit (a resumed one too) still
    holds the warm-up: it logged a slow FLOP/s and images/s. Now the figures start at a fit's second step."""
    logged: list[tuple[int, str]] = []
    real = callbacks.log_step_value

    def spy(module, key, value, **kwargs):
        logged.append((module.trainer.global_step, key))
        return real(module, key, value, **kwargs)

    monkeypatch.setattr(callbacks, "log_step_value", spy)
    throughput = Throughput(flops_per_step=1e6, peak_flops=1e9)
    fit(tmp_path, [throughput], steps=3)
    assert sorted({step for step, _ in logged}) == [2, 3]  # global_step after the batch: the second and third
    logged.clear()
    fit(tmp_path / "again", [throughput], steps=2)  # the same callback, a new fit (as a resume makes)
    assert sorted({step for step, _ in logged}) == [2]
