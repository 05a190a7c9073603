"""The SLURM batch job a run is in, read from the environment (without Lightning, so the config check can use it)."""

from __future__ import annotations

import os
import re


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes (``ARRAYJOB_TASK`` for an array task), or None outside a SLURM batch job."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # an interactive allocation
        return None
    return job if re.fullmatch(r"[0-9_]+", job) else None
