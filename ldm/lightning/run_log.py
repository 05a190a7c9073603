"""The run folder's log file: Lightning's lines and ldm's own go there as well as to the console.

Apart from the console module, because it imports no Lightning: ``train.py`` sets it up before Lightning is imported,
so a wrong input found by the config check is in the file too."""

from __future__ import annotations

import logging


def log_to_run_file() -> logging.Logger:
    """Send the run's log lines (Lightning's, hence the stage headlines and closing lines) to the run folder's log
    file as well as the console, and return the logger for ldm's own lines there.

    Hydra writes ``<run>/<script>.log`` through a file handler on the root logger, but Lightning's logger does not
    propagate to the root, so the file would stay empty. The file handlers are shared; the console keeps
    Lightning's plain lines.
    """
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    run_log = logging.getLogger("ldm.run")
    run_log.setLevel(logging.INFO)
    run_log.propagate = False
    for logger in (logging.getLogger("lightning.pytorch"), logging.getLogger("lightning.fabric"), run_log):
        for handler in files:
            if handler not in logger.handlers:
                logger.addHandler(handler)
    return run_log
