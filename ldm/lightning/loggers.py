"""A CSV logger that a resumed run continues: the same version folder, the rows logged before the resumed step kept.

Lightning's CSVLogger deletes ``metrics.csv`` when its version folder exists, so a resumed run could either lose its
history or start a new version; neither is "the same logger run".
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


def _read_rows(path: Path) -> tuple[list[str], list[dict]]:
    """The header and rows of the CSV file ``path``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _write_rows(path: Path, keys: list[str], rows: list[dict]) -> None:
    """Replace the CSV file ``path`` with ``rows`` under the header ``keys``, atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class _ContinuingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv``, minus its rows at or after ``resume_step`` (work the checkpoint lacks)."""

    def __init__(self, log_dir: str, resume_step: int | None):
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        keys, rows = _read_rows(path)
        if self._resume_step is not None:
            rows = [r for r in rows if r.get("step") in (None, "") or int(r["step"]) < self._resume_step]
        _write_rows(path, keys, rows)
        self.metrics_keys = keys

    def drop_rows(self, step: int, prefix: str) -> None:
        """Drop the rows of ``step`` that hold a metric named ``prefix...``, written or pending."""

        def stale(row: dict) -> bool:
            return str(row.get("step")) == str(step) and any(
                k.startswith(prefix) and v not in ("", None) for k, v in row.items())

        self.metrics = [r for r in self.metrics if not stale(r)]
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        keys, rows = _read_rows(path)
        kept = [r for r in rows if not stale(r)]
        if len(kept) != len(rows):
            _write_rows(path, keys, kept)


class CSVLogger(_LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` that continues ``version``'s ``metrics.csv`` from ``resume_step``."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._resume_step)
        return self._experiment

    @rank_zero_only
    def drop_rows(self, step: int, prefix: str) -> None:
        """Forget the rows of ``step`` holding ``prefix...`` metrics (a validation a resumed run logs again)."""
        self.experiment.drop_rows(step, prefix)
