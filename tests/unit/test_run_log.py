"""The run folder's log file gets each of Lightning's lines once, and a multirun's earlier job's file none of a later
job's (Hydra's basic launcher runs the jobs in one process and gives each its own file handler)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from ldm.lightning.run_log import log_to_run_file


@pytest.fixture
def lightning_logger():
    logger = logging.getLogger("lightning.pytorch")
    root = logging.getLogger()
    saved = (logger.propagate, list(logger.handlers), list(root.handlers), root.level)
    root.setLevel(logging.INFO)
    yield logger
    logger.propagate = saved[0]
    for handler in [*logger.handlers, *root.handlers]:
        handler.close()
    logger.handlers[:], root.handlers[:] = saved[1], saved[2]
    root.setLevel(saved[3])
    log_to_run_file()  # drop what the test's calls added


def _job(root: logging.Logger, path: Path) -> logging.FileHandler:
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(path)
    root.addHandler(handler)
    return handler


@pytest.mark.parametrize("propagate", [True, False])
def test_each_line_once_and_only_in_its_jobs_file(tmp_path: Path, lightning_logger, propagate: bool) -> None:
    root = logging.getLogger()
    lightning_logger.propagate = propagate  # True: Lightning imported after Hydra set up the root's handlers
    first, second = tmp_path / "job0.log", tmp_path / "job1.log"
    _job(root, first)
    log_to_run_file()
    lightning_logger.info("resumed job 0")
    log_to_run_file()  # stages.run calls it again after train.py did
    lightning_logger.info("stage of job 0")
    _job(root, second)
    log_to_run_file()
    lightning_logger.info("resumed job 1")
    for handler in root.handlers:
        handler.flush()
    assert first.read_text().splitlines() == ["resumed job 0", "stage of job 0"]
    assert second.read_text().splitlines() == ["resumed job 1"]


def test_the_console_shows_lightnings_lines_once(tmp_path: Path, lightning_logger, monkeypatch) -> None:
    """Lightning's package logger prints its records on a console handler of its own; Hydra's console handler on the
    root printed them a second time (each stage headline and closing line twice). Other records still reach it."""
    import lightning  # noqa: F401  (its package logger's console handler)

    root = logging.getLogger()
    ours, hydras = io.StringIO(), io.StringIO()
    console = logging.StreamHandler(hydras)
    root.addHandler(console)
    package = logging.getLogger("lightning")
    own = next(h for h in package.handlers if type(h) is logging.StreamHandler)
    monkeypatch.setattr(own, "stream", ours)
    lightning_logger.propagate = True
    file = _job(root, tmp_path / "job.log")
    log_to_run_file()
    lightning_logger.info("==> ldm stage")
    logging.getLogger("ldm.something").warning("a line of another logger")
    file.flush()
    assert ours.getvalue().count("==> ldm stage") == 1
    assert "==> ldm stage" not in hydras.getvalue() and "a line of another logger" in hydras.getvalue()
    assert (tmp_path / "job.log").read_text().count("==> ldm stage") == 1
    log_to_run_file()  # a later call (the next job of a multirun) leaves one filter, not two
    assert len([f for f in console.filters if type(f).__name__ == "_NotLightningsOwn"]) == 1


def test_an_offline_wandb_run_starts_without_wandbs_anonymous_warning(tmp_path: Path, capfd) -> None:
    """Lightning passes anonymous=None to wandb.init always, and wandb warned at every stage's start that the
    setting has no effect: a line the user cannot act on. make_logger drops it; the run still starts offline."""
    import wandb
    from omegaconf import OmegaConf

    from ldm.lightning.stages import make_logger

    cfg = OmegaConf.create({"logger": {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "ldm",
                                       "offline": True, "save_dir": str(tmp_path), "log_model": False}})
    logger = make_logger(cfg, "ldm", tmp_path / "ldm")
    try:
        assert logger.experiment.settings.mode in ("offline", "dryrun")  # wandb names offline "dryrun"
    finally:
        wandb.finish()
    out = capfd.readouterr()
    assert "anonymous" not in out.out + out.err
