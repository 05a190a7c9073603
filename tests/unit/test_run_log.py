"""The run folder's log file gets each of Lightning's lines once, and a multirun's earlier job's file none of a later
job's (Hydra's basic launcher runs the jobs in one process and gives each its own file handler)."""

from __future__ import annotations

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
