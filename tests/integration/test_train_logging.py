"""Logging of a tiny train.py run: wandb offline (one run per stage, metrics, sample images, config) and the
throughput metrics (images/s, model TFLOP/s, MFU) and gradient norm."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

from tests.integration.tiny_run import read_metrics, run_train, train_env

BLOCK, HEADER = 32768, 7  # the LevelDB log layout of a .wandb file: 32 KiB blocks of records with 7-byte headers


def wandb_records(path: Path) -> Iterator[pb.Record]:
    """The records of an offline run's ``run-ID.wandb`` file (what ``wandb sync`` uploads)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, pending = HEADER, b""  # the file header (":W&B", magic, version) is 7 bytes too
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL, or LAST of a FIRST/MIDDLE/LAST chain
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_offline_run(run_dir: Path) -> dict:
    """Name, config keys and history rows ({key: json value}) of an offline run directory."""
    (path,) = run_dir.glob("run-*.wandb")
    out: dict = {"name": None, "config": set(), "history": []}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"] = record.run.display_name
            out["config"] |= {u.key for u in record.run.config.update}
        elif kind == "config":
            out["config"] |= {u.key for u in record.config.update}
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return out


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wandb")
    run_train(tmp, "logger=wandb", "vae_stage.max_steps=3", "ldm_stage.max_steps=3",
              "callbacks.ldm.samples.every_n_steps=2",
              "callbacks.vae.reconstructions.every_n_steps=2",
              "perf.peak_flops=1e12", env=train_env(WANDB_DIR=str(tmp / "wandb_dir"), WANDB_SILENT="true"))
    return tmp / "run"


def test_wandb_offline_runs_hold_metrics_images_and_config(wandb_run):
    runs = sorted((wandb_run / "wandb").glob("offline-run-*"))  # save_dir is the run directory: offline by default
    assert len(runs) == 2, runs  # close_loggers ended the vae stage's run: the ldm stage has its own
    by_name = {r["name"]: (d, r) for d in runs for r in [read_offline_run(d)]}
    assert set(by_name) == {"vae", "ldm"}
    for name, (_, run) in by_name.items():
        assert {"optimizer", "vae_stage", "ldm_stage", "seed"} <= run["config"], name  # the resolved config
        metrics = [row for row in run["history"] if "train/loss" in row]
        assert [int(row["trainer/global_step"]) for row in metrics] == [0, 1, 2], name
        for key in ("train/grad_norm", "train/lr"):
            assert all(key in row for row in metrics), (name, key)
        # from the 2nd step: the first holds the warm-up and the FLOP count
        assert all("perf/tflops" in row and "perf/mfu" in row and "perf/images_per_s" in row for row in metrics[1:])
        assert "perf/images_per_s" not in metrics[0], name
    vae_rows = by_name["vae"][1]["history"]
    assert all("train/psnr" in row for row in vae_rows if "train/loss" in row)
    assert not any("samples/_type" in row for row in vae_rows)
    recs = [row for row in vae_rows if row.get("reconstructions/_type") == '"images/separated"']
    assert [int(row["trainer/global_step"]) for row in recs] == [2, 3]  # every 2 steps and at the end
    ldm_dir, ldm = by_name["ldm"]
    images = [row for row in ldm["history"] if row.get("samples/_type") == '"images/separated"']
    assert [int(row["trainer/global_step"]) for row in images] == [2, 3]  # every 2 steps and at the end
    pngs = sorted((ldm_dir / "files" / "media" / "images").glob("samples_*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 0 for p in pngs)


def test_csv_run_logs_throughput_and_grad_norm(tmp_path):
    run_train(tmp_path, "vae_stage.max_steps=3", "ldm_stage.max_steps=3")  # logger=csv, perf.peak_flops unset
    for version in ("version_0", "version_1"):  # vae stage, ldm stage
        rows = read_metrics(tmp_path / "run" / "logs" / version / "metrics.csv")
        assert sorted(rows) == [0, 1, 2]
        assert all(rows[s]["train/grad_norm"] > 0 for s in rows)
        assert all(rows[s]["perf/tflops"] > 0 and rows[s]["perf/images_per_s"] > 0 for s in (1, 2))  # model FLOP/s,
        assert "perf/images_per_s" not in rows[0]  # without a peak to divide by; the first step gives no figures
        assert not any("perf/mfu" in row for row in rows.values())
