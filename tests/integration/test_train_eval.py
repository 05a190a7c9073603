"""Metrics during a tiny train.py run: the deterministic validation loss on held-out shards (every N steps and at
the end, with the best checkpoint kept by val/loss) and the evaluation callback's FID/KID against reference
statistics, in the CSV and in an offline wandb run; missing extractor weights stop the run before training."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from ldm.data.make_shards import make_shards
from ldm.eval.metrics import ENV_VARS
from ldm.eval.ref_stats import make_ref_stats
from tests.integration.test_train_logging import read_offline_run
from tests.integration.tiny_run import read_metrics, run_train, train_cmd, train_env

TIMESTEPS = [62, 187, 312, 437, 562, 687, 812, 937]  # the centres of 8 equal bins of [0, 1000)
N = 4  # generated images per evaluation: eval/fid_n4


def random_inception(path: Path) -> str:
    """A weights file torch-fidelity's InceptionV3 loads (feature_extractor_weights_path): its own modules with
    seeded random weights (He-normal convolutions, so the features are informative enough for a finite FID)."""
    placeholder = path.with_name("placeholder.pth")
    torch.save({}, placeholder)
    with torch.random.fork_rng(), mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None):
        torch.manual_seed(1)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=str(placeholder))
        for conv in (m for m in net.modules() if isinstance(m, torch.nn.Conv2d)):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("train_eval")
    make_shards("shapes", tmp / "val", maxcount=3, length=7, size=16, seed=5, log=None)  # 3 shards: 3, 3, 1
    weights = random_inception(tmp / "inception-random.pth")
    make_ref_stats(tmp / "val", tmp / "ref.npz", weights_path=weights, batch_size=8)
    return {"tmp": tmp, "weights": weights, "ref": tmp / "ref.npz"}


def eval_overrides(setup: dict, every: int) -> list[str]:
    return [
        f"data.val_shards={setup['tmp'] / 'val'}", "ldm_stage.val_every_n_steps=2",
        f"callbacks.ldm.evaluation.ref_stats={setup['ref']}", f"eval.inception_weights={setup['weights']}",
        f"callbacks.ldm.evaluation.every_n_steps={every}", f"callbacks.ldm.evaluation.n={N}",
        "callbacks.ldm.evaluation.batch_size=2", "callbacks.ldm.evaluation.kid=true",
        f"callbacks.ldm.evaluation.kid_subset_size={N}",
        "callbacks.ldm.evaluation.captions=[a red circle in the top left,a blue square in the center]",
    ]


def env() -> dict[str, str]:
    return {k: v for k, v in train_env().items() if k not in ENV_VARS.values()}


@pytest.fixture(scope="module")
def csv_run(setup) -> Path:
    run_train(setup["tmp"], "vae_stage.max_steps=2", "ldm_stage.max_steps=5", *eval_overrides(setup, every=4),
              env=env())
    return setup["tmp"] / "run"


def test_csv_holds_the_validation_loss_and_fid_at_the_expected_steps(csv_run):
    rows = read_metrics(csv_run / "logs" / "version_1" / "metrics.csv")  # the ldm stage
    # the quickstart preset caches latents: the validation images were encoded once too, into their own folder
    caches = {folder: sorted(p.name for p in (csv_run / folder).iterdir()) for folder in ("latents", "latents_val")}
    assert caches["latents_val"] == caches["latents"]
    # validation after optimizer steps 2, 4 and the last (5), logged where Lightning logs that batch: N - 1
    val_steps = sorted(s for s, r in rows.items() if "val/loss" in r)
    assert val_steps == [1, 3, 4]
    for s in val_steps:
        per_t = [rows[s][f"val/loss_t{t}"] for t in TIMESTEPS]
        assert all(math.isfinite(v) and v > 0 for v in per_t)
        assert rows[s]["val/loss"] == pytest.approx(sum(per_t) / len(per_t), rel=1e-5)
    eval_steps = sorted(s for s, r in rows.items() if f"eval/fid_n{N}" in r)
    assert eval_steps == [3, 4]  # every 4 steps and at the end (step 5), in the rows of the same weights
    for s in eval_steps:
        for key in (f"eval/fid_n{N}", f"eval/kid_n{N}", f"eval/kid_std_n{N}"):
            assert math.isfinite(rows[s][key]), (s, key)
        assert rows[s][f"eval/fid_n{N}"] > 0
    hparams = yaml.safe_load((csv_run / "logs" / "version_1" / "hparams.yaml").read_text())
    protocol = hparams["eval_protocol"]
    assert protocol["extractor"] == "inception-v3-compat" and protocol["n"] == N and "299" in protocol["resize"]
    assert protocol["ref_stats"] == str(csv_run.parent / "ref.npz")
    assert protocol["image_size"] == "16x16"  # the generated images', as the reference's


def test_best_checkpoint_is_the_step_of_the_lowest_val_loss(csv_run):
    rows = read_metrics(csv_run / "logs" / "version_1" / "metrics.csv")
    losses = {s + 1: r["val/loss"] for s, r in rows.items() if "val/loss" in r}  # by optimizer step
    (best,) = sorted((csv_run / "ldm" / "checkpoints").glob("best-step*.ckpt"))
    step = min(losses, key=losses.get)
    assert best.name == f"best-step{step:06d}.ckpt"
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step
    (state,) = [v for k, v in ckpt["callbacks"].items() if "val/loss" in k]
    assert state["best_model_score"].item() == pytest.approx(losses[step], rel=1e-5)
    assert (csv_run / "ldm" / "checkpoints" / "last.ckpt").is_file()
    record = json.loads((csv_run / "ldm" / "checkpoints" / "best.json").read_text())  # for a sweep to select on
    assert record["monitor"] == "val/loss" and record["checkpoint"] == str(best)
    assert record["score"] == pytest.approx(losses[step], rel=1e-5)


def test_wandb_offline_run_holds_the_metrics(setup, csv_run):
    tmp = setup["tmp"]
    run_train(tmp, "logger=wandb", "stages=[ldm]", f"vae_ckpt={csv_run / 'vae' / 'vae.ckpt'}",
              "ldm_stage.max_steps=2", "ldm_stage.cache_latents=false", *eval_overrides(setup, every=0),
              run_dir=tmp / "wandb_run",
              env={**env(), "WANDB_DIR": str(tmp / "wandb_dir"), "WANDB_SILENT": "true"})
    (run_dir,) = sorted((tmp / "wandb_run" / "wandb").glob("offline-run-*"))
    run = read_offline_run(run_dir)
    val = [r for r in run["history"] if "val/loss" in r]
    assert [int(r["trainer/global_step"]) for r in val] == [1]  # after step 2, the last
    assert all(math.isfinite(float(val[0][f"val/loss_t{t}"])) for t in TIMESTEPS)
    fid = [r for r in run["history"] if f"eval/fid_n{N}" in r]
    assert [int(r["trainer/global_step"]) for r in fid] == [1]  # every_n_steps=0: at the end only
    assert math.isfinite(float(fid[0][f"eval/fid_n{N}"])) and math.isfinite(float(fid[0][f"eval/kid_n{N}"]))
    assert "eval_protocol" in run["config"]  # the protocol, once


def test_missing_extractor_weights_stop_the_run_before_training(setup, tmp_path):
    overrides = [o for o in eval_overrides(setup, every=2) if not o.startswith("eval.inception_weights")]
    cmd = train_cmd(tmp_path / "run", setup["tmp"] / "shards", *overrides,
                    f"eval.inception_weights={tmp_path / 'missing.pth'}")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "callbacks.ldm.evaluation" in proc.stderr and "missing.pth" in proc.stderr
    assert not (tmp_path / "run" / "vae").exists()  # no stage started


@pytest.mark.slow
def test_validation_loss_does_not_depend_on_the_number_of_ranks(setup, csv_run):
    """With the weights frozen (lr 0), one process and two DDP ranks (7 samples: 4 + 3, rank 1 padded) report the
    same val/loss: fixed timesteps, noise seeded per sample index, every sample counted once."""
    tmp = setup["tmp"]
    common = ["stages=[ldm]", f"vae_ckpt={csv_run / 'vae' / 'vae.ckpt'}", "optimizer.lr=0", "ldm_stage.max_steps=2",
              "ldm_stage.val_every_n_steps=2", f"data.val_shards={tmp / 'val'}", "ldm_stage.cache_latents=false"]
    values = []
    for name, extra in (("one_rank", []), ("two_ranks", ["trainer=ddp_cpu"])):
        run_train(tmp, *common, *extra, run_dir=tmp / name, timeout=600, env=env())
        (log,) = (tmp / name / "logs").glob("version_*/metrics.csv")
        values.append({k: v for r in read_metrics(log).values() for k, v in r.items() if k.startswith("val/")})
    assert set(values[0]) == {"val/loss", *(f"val/loss_t{t}" for t in TIMESTEPS)}
    for key, value in values[0].items():
        assert values[1][key] == pytest.approx(value, rel=1e-6), key
