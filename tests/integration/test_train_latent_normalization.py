"""train.py with vae_stage.latent_normalization=per_channel: the VAE stage fits each latent channel's mean and std,
and the ldm stage, its checkpoint, the pipeline and a fine-tune from it use them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import load_autoencoder, load_first_stage
from ldm.pipeline import LatentDiffusionPipeline
from tests.integration.tiny_run import run_train


@pytest.fixture(scope="module")
def per_channel_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("per_channel")
    proc = run_train(tmp, "stages=[vae,ldm]", "vae_stage.max_steps=2", "ldm_stage.max_steps=2",
                     "vae_stage.latent_normalization=per_channel", run_dir=tmp / "run")
    return tmp / "run", proc


def test_a_per_channel_normalisation_is_fitted_saved_and_sampled_with(per_channel_run) -> None:
    run, proc = per_channel_run
    assert "latent mean " in proc.stdout + proc.stderr  # the stage's summary names what it fitted
    vae = load_autoencoder(run / "vae" / "vae.ckpt")
    assert vae.config["scale_factor"] == 1.0 and vae.config["shift_factor"] is None
    assert len(vae.config["latent_mean"]) == len(vae.config["latent_std"]) == vae.embed_dim
    assert min(vae.config["latent_std"]) > 0 and len(set(vae.config["latent_std"])) == vae.embed_dim
    ckpt = run / "ldm" / "checkpoints" / "last.ckpt"
    first = load_first_stage(ckpt)  # the LDM checkpoint carries the same normalisation
    for key in ("scale_factor", "latent_mean", "latent_std"):
        assert first.config[key] == vae.config[key]
    z = torch.randn(2, vae.embed_dim, 4, 4)
    torch.testing.assert_close(first.normalize_latents(z), vae.normalize_latents(z))
    pipe = LatentDiffusionPipeline.from_checkpoint(ckpt)
    torch.testing.assert_close(pipe.vae.latent_scale, vae.latent_scale)
    out = pipe(["a red circle in the top left"], num_inference_steps=2, output_type="tensor")
    assert out.shape[1] == 3 and torch.isfinite(out).all()


def test_fine_tuning_a_per_channel_model_keeps_its_normalisation(per_channel_run, tmp_path: Path) -> None:
    """init_ckpt builds the VAE from the config with the file's normalisation: a per-channel model's mean and std
    must come along, or the fine-tune would train on latents normalised another way than its base's."""
    base = per_channel_run[0] / "ldm" / "checkpoints" / "last.ckpt"
    proc = run_train(tmp_path, "stages=[ldm]", f"+init_ckpt={base}", "ldm_stage.max_steps=1",
                     run_dir=tmp_path / "tune")
    assert "latent_std [" in proc.stdout + proc.stderr
    base_vae = load_first_stage(base)
    tuned = load_first_stage(tmp_path / "tune" / "ldm" / "checkpoints" / "last.ckpt")
    for key in ("scale_factor", "shift_factor", "latent_mean", "latent_std"):
        assert tuned.config[key] == base_vae.config[key], key
