"""Exact resume: a run resumed in a new process from a mid-run checkpoint reproduces the uninterrupted loss curve."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.integration.tiny_run import read_metrics, run_train

N, K = 10, 7  # steps in all; the checkpoint step (epochs of 6 batches: the resume lands mid-epoch, in the second)
LDM = ["stages=[ldm]", f"ldm_stage.max_steps={N}", f"callbacks.ldm.checkpoint.every_n_train_steps={K}",
       "ldm_stage.batch_size=8", "ldm_stage.warmup_steps=3", "ldm_stage.lr_schedule=cosine", "ldm_stage.ema_decay=0.9",
       "ldm_stage.caption_dropout=0.3",
       "ldm_stage.guide_snapshot_step=8"]  # autoguidance snapshot after the resume point: the resumed run takes it
VAE = ["stages=[vae]", "vae_stage.lr_schedule=constant"]  # constant LR: a run stopped by max_steps resumes exactly


def assert_same_curve(full: dict[int, dict[str, float]], resumed: dict[int, dict[str, float]], steps: range,
                      keys: tuple[str, ...]) -> None:
    assert sorted(s for s in resumed if s in steps) == list(steps), f"resumed run logged steps {sorted(resumed)}"
    for step in steps:
        for key in keys:
            a, b = full[step][key], resumed[step][key]
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), f"step {step} {key}: uninterrupted {a}, resumed {b}"


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory) -> Path:
    """An uninterrupted 8-step VAE run: its curve for the VAE test, its vae.ckpt for the ldm test."""
    tmp = tmp_path_factory.mktemp("resume")
    run_train(tmp, *VAE, "vae_stage.max_steps=8", run_dir=tmp / "vae_full")
    return tmp / "vae_full" / "vae" / "vae.ckpt"


@pytest.fixture(scope="module")
def ldm_full(vae_ckpt) -> Path:
    """An uninterrupted ldm-only run on that VAE: the resume test's reference and the two-stage test's "alone" run."""
    full = vae_ckpt.parents[2] / "full"
    run_train(full.parent, *LDM, f"vae_ckpt={vae_ckpt}", run_dir=full)
    return full


def test_ldm_stage_resumes_exactly(vae_ckpt, ldm_full):
    tmp = vae_ckpt.parents[2]
    full, resumed = ldm_full, tmp / "resumed"
    mid = full / "ldm" / "checkpoints" / f"step{K:06d}.ckpt"
    assert mid.is_file(), sorted(p.name for p in (full / "ldm" / "checkpoints").iterdir())
    # A new process, in a run folder holding only the step-K checkpoint and the run's config (no vae_ckpt, no
    # latents, no logs): the checkpoint alone is enough to resume. The run continues in its checkpoint's folder.
    (resumed / "ldm" / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "overrides.yaml"):
        shutil.copy(full / "ldm" / name, resumed / "ldm" / name)
    start = shutil.copy(mid, resumed / "ldm" / "checkpoints" / mid.name)
    run_train(tmp, *LDM, f"resume={start}", run_dir=tmp / "elsewhere")  # periodic names hold no "=": no quoting
    assert not (tmp / "elsewhere" / "ldm").exists()

    a = read_metrics(full / "logs" / "version_0" / "metrics.csv")
    b = read_metrics(resumed / "logs" / "version_0" / "metrics.csv")
    assert sorted(a) == list(range(N))
    # loss (data position, t, noise, caption dropout, posterior samples), lr (schedule), grad norm (weights, optimizer)
    assert_same_curve(a, b, range(K, N), ("train/loss", "train/lr", "train/grad_norm"))
    assert min(b) == K  # the resumed run starts where the checkpoint left off, not at step 0
    # the quickstart's in-run latent cache: the resumed run re-encodes with the checkpoint's VAE weights (not a fresh
    # initialisation restored only later by Lightning), so its cache has the same VAE fingerprint
    assert [p.name for p in (resumed / "latents").iterdir()] == [p.name for p in (full / "latents").iterdir()]

    assert int(state(mid)["ema.num_updates"]) == K  # the checkpoint at step K holds step K's EMA update
    assert not state(mid)["guide_taken"]
    # last.ckpt is the final state (not the last periodic save): UNet, text encoder and EMA weights agree
    end_a = state(full / "ldm" / "checkpoints" / "last.ckpt")
    end_b = state(resumed / "ldm" / "checkpoints" / "last.ckpt")
    assert end_a.keys() == end_b.keys() and any(k.startswith("ema.") for k in end_a)
    assert int(end_a["ema.num_updates"]) == int(end_b["ema.num_updates"]) == N
    assert end_b["guide_taken"] and any(k.startswith("guide_unet.") for k in end_b)  # compared below, too
    for k in end_a:
        torch.testing.assert_close(end_b[k], end_a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_the_ldm_stage_trains_one_model_after_the_vae_stage_or_alone(vae_ckpt, ldm_full):
    """A whole run's ldm stage equals ``stages=[ldm] vae_ckpt=...`` on its VAE with the same seed, and a run resumed
    between its stages: the vae stage's draws do not move the ldm stage's initialisation."""
    tmp = vae_ckpt.parents[2]
    ldm = [o for o in LDM if not o.startswith("stages=")]
    run_train(tmp, "stages=[vae,ldm]", *VAE[1:], "vae_stage.max_steps=8", *ldm, run_dir=tmp / "whole")
    whole_vae = torch.load(tmp / "whole" / "vae" / "vae.ckpt", map_location="cpu", weights_only=False)
    alone_vae = torch.load(vae_ckpt, map_location="cpu", weights_only=False)
    for k, v in alone_vae["state_dict"].items():  # the same VAE under both
        torch.testing.assert_close(whole_vae["state_dict"][k], v, rtol=0, atol=0, msg=k)
    # a run stopped after its vae stage: its folder holds the vae stage alone, and the same command resumes it
    shutil.copytree(tmp / "whole" / "vae", tmp / "between" / "vae")
    run_train(tmp, "stages=[vae,ldm]", *VAE[1:], "vae_stage.max_steps=8", *ldm, "resume=last", run_dir=tmp / "between")
    a = state(tmp / "whole" / "ldm" / "checkpoints" / "last.ckpt")
    assert any(k.startswith("unet.") for k in a)
    for other in (ldm_full, tmp / "between"):  # alone, and resumed between the stages
        b = state(other / "ldm" / "checkpoints" / "last.ckpt")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{other}: {k}")


def test_vae_stage_resumes_exactly(vae_ckpt):
    tmp = vae_ckpt.parents[2]
    run_train(tmp, *VAE, "vae_stage.max_steps=5", run_dir=tmp / "vae_stopped")  # a run stopped at step 5 ...
    last = tmp / "vae_stopped" / "vae" / "checkpoints" / "last.ckpt"
    # ... resumed to 8 (max_steps may change on resume), in its own folder and logger run
    run_train(tmp, *VAE, "vae_stage.max_steps=8", f"resume={last}", run_dir=tmp / "vae_resumed")

    a = read_metrics(tmp / "vae_full" / "logs" / "version_0" / "metrics.csv")
    b = read_metrics(tmp / "vae_stopped" / "logs" / "version_0" / "metrics.csv")
    assert sorted(b) == list(range(8))
    # loss and KL depend on the posterior samples (the module's generator, restored), grad norm on weights + Adam
    assert_same_curve(a, b, range(5, 8), ("train/loss", "train/kl", "train/grad_norm", "train/lr"))
    full_vae = torch.load(vae_ckpt, map_location="cpu", weights_only=False)
    resumed_vae = torch.load(tmp / "vae_stopped" / "vae" / "vae.ckpt", map_location="cpu", weights_only=False)
    assert resumed_vae["latent_scale"] == pytest.approx(full_vae["latent_scale"], rel=1e-6)
    for k, v in full_vae["state_dict"].items():
        torch.testing.assert_close(resumed_vae["state_dict"][k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_a_vae_stage_cut_off_before_vae_ckpt_writes_it_on_resume(vae_ckpt):
    """A vae run that stopped after its last checkpoint but before vae.ckpt (the normalisation fit between them cut
    short by a kill or a preemption signal at the last step) is not finished: the resume fits and writes vae.ckpt,
    the one the uninterrupted run wrote."""
    tmp = vae_ckpt.parents[2]
    cut = tmp / "vae_cut"
    shutil.copytree(vae_ckpt.parents[1], cut)
    (cut / "vae" / "vae.ckpt").unlink()
    proc = run_train(tmp, *VAE, "vae_stage.max_steps=8", "resume=last", run_dir=cut)
    assert "nothing to resume" not in proc.stdout + proc.stderr
    full = torch.load(vae_ckpt, map_location="cpu", weights_only=False)
    written = torch.load(cut / "vae" / "vae.ckpt", map_location="cpu", weights_only=False)
    assert written["latent_scale"] == pytest.approx(full["latent_scale"], rel=1e-6)
    for k, v in full["state_dict"].items():
        torch.testing.assert_close(written["state_dict"][k], v, rtol=0, atol=0, msg=k)


def test_periodic_checkpoints_keep_the_newest_or_all(vae_ckpt):
    """By default a run keeps only its newest periodic checkpoint (plus last.ckpt); save_top_k=-1 keeps each."""
    tmp = vae_ckpt.parents[2]
    common = ["stages=[ldm]", f"vae_ckpt={vae_ckpt}", "ldm_stage.max_steps=5",
              "callbacks.ldm.checkpoint.every_n_train_steps=2"]
    run_train(tmp, *common, run_dir=tmp / "keep_newest")
    run_train(tmp, *common, "callbacks.ldm.checkpoint.save_top_k=-1", run_dir=tmp / "keep_all")
    names = {d: sorted(p.name for p in (tmp / d / "ldm" / "checkpoints").glob("*.ckpt"))
             for d in ("keep_newest", "keep_all")}
    assert names["keep_newest"] == ["last.ckpt", "step000004.ckpt"]
    assert names["keep_all"] == ["last.ckpt", "step000002.ckpt", "step000004.ckpt"]
