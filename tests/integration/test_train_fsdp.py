"""trainer=fsdp_cpu: two processes over gloo train the ldm stage under FSDP, with the EMA, the
validation loss of the EMA weights and the sample grid, and end with the same weights, EMA and validation losses as
the same run under DDP (which the DDP test checks on its own). Under both strategies, a run resumed from its mid-run
checkpoint ends where the uninterrupted one did."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from ldm.data.make_shards import make_shards
from tests.integration.tiny_run import ROOT, TINY_MODELS, read_metrics, train_env

OVERRIDES = [*TINY_MODELS, "trainer.log_every_n_steps=1", "vae_stage.max_steps=3", "ldm_stage.max_steps=5",
             "callbacks.ldm.checkpoint.every_n_train_steps=3", "ldm_stage.ema_decay=0.9",
             "ldm_stage.cache_latents=false",
             "text_encoder.train_token_embedding=false",  # a frozen part inside a trained one (FSDP leaves it whole)
             "callbacks.ldm.samples.every_n_steps=3"]  # the grid at step 3 and at the end: every rank samples (FSDP)


def _validation(tmp_path) -> list[str]:
    """The ldm stage validates the EMA weights every 2 steps on held-out shards (7 samples over the two ranks)."""
    return [f"data.val_shards={tmp_path / 'val'}", "ldm_stage.val_every_n_steps=2"]


def _train(tmp_path, name: str, trainer: str, *overrides: str):
    run = tmp_path / name
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", f"data.train_shards={tmp_path / 'shards'}",
           *OVERRIDES, f"trainer={trainer}", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A VAE (in one process: the vae stage refuses FSDP), then the same 5-step ldm stage from it under DDP and
    FSDP."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    make_shards("shapes", tmp_path / "val", maxcount=3, length=7, size=16, seed=5, log=None)
    vae = _train(tmp_path, "vae", "cpu", "stages=[vae]") / "vae" / "vae.ckpt"
    # float32: the weights are compared to 1e-4, and FSDP's bf16 keeps its parameters in bf16 for the forward, which
    # autocast under DDP does not (the quickstart's precision auto would pick bf16 on a CPU with native bf16)
    ddp = _train(tmp_path, "ddp", "ddp_cpu", "stages=[ldm]", f"vae_ckpt={vae}", "trainer.precision=32-true",
                 *_validation(tmp_path))
    fsdp = _train(tmp_path, "fsdp", "fsdp_cpu", "stages=[ldm]", f"vae_ckpt={vae}", "trainer.precision=32-true",
                  *_validation(tmp_path))
    return tmp_path, ddp, fsdp


def _last(run):
    return torch.load(run / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_fsdp_trains_the_ldm_stage_to_the_ddp_weights_and_ema(runs):
    _, ddp, fsdp = runs
    c_ddp, c_fsdp = _last(ddp), _last(fsdp)
    assert c_fsdp["global_step"] == 5
    s_ddp, s_fsdp = c_ddp["state_dict"], c_fsdp["state_dict"]
    unet = [k for k in s_ddp if k.startswith("unet.")]
    shadows = [k for k in s_ddp if k.startswith("ema.") and k != "ema.num_updates"]
    # the EMA averages sit under the UNet's own parameter names
    floats = {k[len("unet."):] for k in unet if s_ddp[k].is_floating_point()}
    assert unet and {k[len("ema."):] for k in shadows} == floats
    for k in s_ddp:
        if s_ddp[k].is_floating_point():
            assert s_fsdp[k].shape == s_ddp[k].shape, k  # full tensors, not flat shards
            torch.testing.assert_close(s_fsdp[k], s_ddp[k], rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(s_fsdp[k], s_ddp[k]), k
    assert int(s_fsdp["ema.num_updates"]) == 5
    # the fixed token table, left out of FSDP's flat parameter, is the same after 5 steps as after 3; the text blocks
    # beside it trained
    s_mid = torch.load(fsdp / "ldm" / "checkpoints" / "step000003.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    table = "text_encoder.token_embedding.weight"
    assert torch.equal(s_fsdp[table], s_mid[table])
    blocks = [k for k in s_fsdp if k.startswith("text_encoder.blocks.") and s_fsdp[k].is_floating_point()]
    assert blocks and any(not torch.equal(s_fsdp[k], s_mid[k]) for k in blocks)
    # the logged gradient norm is the global one (squared shard norms summed over ranks), as DDP logs it
    m_ddp, m_fsdp = (read_metrics(r / "logs" / "version_0" / "metrics.csv") for r in (ddp, fsdp))
    for step in range(5):
        assert m_fsdp[step]["train/grad_norm"] == pytest.approx(m_ddp[step]["train/grad_norm"], rel=1e-4), step
    # the validation swaps the EMA in and the training weights back (through the gathered parameters: FSDP's root
    # keeps its gathered parameters after a forward without backward, and the next step's forward reuses them): the
    # same losses as DDP's, and the training weights above
    val_steps = [step for step in m_ddp if "val/loss" in m_ddp[step]]
    assert len(val_steps) >= 2 and val_steps == [step for step in m_fsdp if "val/loss" in m_fsdp[step]]
    for step in val_steps:
        assert m_fsdp[step]["val/loss"] == pytest.approx(m_ddp[step]["val/loss"], rel=1e-4), step

    # the sample grid was written by rank 0, from weights gathered on both ranks
    grids = sorted(p.name for p in (fsdp / "ldm" / "samples").glob("*.png"))
    assert len(grids) == 2, grids
    assert not any(p.name.endswith(".tmp") for p in fsdp.rglob("*"))


@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp_cpu"])
def test_two_rank_runs_resume_exactly(runs, trainer):
    """A copy of the finished run, cut back to its step-3 checkpoint (later checkpoints and log rows gone), resumed
    from that checkpoint: it continues in its own folder and ends where the uninterrupted run did."""
    tmp_path, ddp, fsdp = runs
    full = ddp if trainer == "ddp_cpu" else fsdp
    cut = tmp_path / f"{trainer}_resumed"
    shutil.copytree(full, cut)
    (cut / "ldm" / "checkpoints" / "last.ckpt").unlink()
    metrics = cut / "logs" / "version_0" / "metrics.csv"
    rows = metrics.read_text().splitlines(keepends=True)
    step_col = rows[0].rstrip("\n").split(",").index("step")
    metrics.write_text("".join(r for i, r in enumerate(rows) if i == 0 or int(r.split(",")[step_col]) < 3))
    mid = cut / "ldm" / "checkpoints" / "step000003.ckpt"
    resumed = _train(tmp_path, cut.name, trainer, "stages=[ldm]", f"resume={mid}", *_validation(tmp_path))
    a = read_metrics(full / "logs" / "version_0" / "metrics.csv")
    b = read_metrics(resumed / "logs" / "version_0" / "metrics.csv")
    assert sorted(b) == sorted(a) == [0, 1, 2, 3, 4]  # the kept rows, then steps 3 and 4 logged by the resumed run
    for step in range(5):  # loss: data position, t, noise and caption dropout per rank; grad norm: weights + AdamW
        for key in ("train/loss", "train/lr", "train/grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6), (step, key)
    end_a, end_b = _last(full)["state_dict"], _last(resumed)["state_dict"]
    assert end_a.keys() == end_b.keys() and int(end_b["ema.num_updates"]) == 5
    for k in end_a:
        torch.testing.assert_close(end_b[k], end_a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_fsdp_under_bf16_mixed_keeps_the_ema_in_float32_and_moving(runs):
    # Lightning's FSDP would cast every buffer (the EMA shadows among them) to bfloat16 at the first forward
    tmp_path, _, fsdp = runs
    vae = tmp_path / "vae" / "vae" / "vae.ckpt"
    run = _train(tmp_path, "fsdp_bf16", "fsdp_cpu", "stages=[ldm]", f"vae_ckpt={vae}", "trainer.precision=bf16-mixed",
                 *_validation(tmp_path))  # the float32 VAE, left unsharded, encodes FSDP's bf16 inputs there too
    mid = torch.load(run / "ldm" / "checkpoints" / "step000003.ckpt", map_location="cpu", weights_only=False)
    end = _last(run)["state_dict"]
    shadows = [k for k in end if k.startswith("ema.") and k != "ema.num_updates"]
    assert shadows and all(end[k].dtype == torch.float32 for k in shadows)
    assert int(end["ema.num_updates"]) == 5
    assert any(not torch.equal(end[k], mid["state_dict"][k]) for k in shadows)  # steps 4 and 5 moved the average
    assert "val/loss" in read_metrics(run / "logs" / "version_0" / "metrics.csv")[4]


@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp_cpu"])
def test_nan_policy_skip_on_two_ranks_in_the_host_mode_skips_the_updates(runs, trainer):
    """An unfused optimizer tests the loss on the host. On two ranks Lightning refuses a skipped (None) loss, so the
    backward runs and the update is dropped: after an absurd learning rate makes every loss from step 2 on NaN, the
    run ends, counts the skips, and its weights stay those of step 1 (no weight decay, no momentum applied)."""
    tmp_path, _, _ = runs
    vae = tmp_path / "vae" / "vae" / "vae.ckpt"
    run = _train(tmp_path, f"nan_{trainer}", trainer, "stages=[ldm]", f"vae_ckpt={vae}", "trainer.precision=32-true",
                 "optimizer.fused=false", "optimizer.lr=1e12", "ldm_stage.nan_policy=skip",
                 "ldm_stage.max_nan_skips=10", "trainer.gradient_clip_val=null")
    end = _last(run)
    mid = torch.load(run / "ldm" / "checkpoints" / "step000003.ckpt", map_location="cpu", weights_only=False)
    assert end["global_step"] == 5 and end["nan_skips"] == 4
    weights = [k for k in end["state_dict"] if k.startswith("unet.")]
    for k in weights:
        assert torch.isfinite(end["state_dict"][k]).all(), k
        torch.testing.assert_close(end["state_dict"][k], mid["state_dict"][k], rtol=0, atol=0, msg=k)
