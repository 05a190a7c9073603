"""The run folder's log file: Lightning's lines and ldm's own go there as well as to the console.

Apart from the console module, because it imports no Lightning: ``train.py`` sets it up before Lightning is imported,
so a wrong input found by the config check is in the file too."""

from __future__ import annotations

import logging

# (logger, handler) pairs this module added: a later call (the next job of a multirun in the same process, whose
# file handler Hydra replaced) takes them off, so an earlier job's file gets none of the later job's lines
_added: list[tuple[logging.Logger, logging.Handler]] = []
_filtered: list[logging.Handler] = []  # the root's console handlers given a _NotLightningsOwn filter


class _NotLightningsOwn(logging.Filter):
    """Drops Lightning's records where Lightning prints them itself: its package logger (``lightning``) has a
    console handler of its own, so a record that also propagates to a console handler of the root (Hydra's) was
    shown twice, once as ``INFO: ...`` and once in Hydra's format."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "lightning" and not record.name.startswith("lightning."):
            return True
        return not any(_is_console(h) for h in logging.getLogger("lightning").handlers)


def _is_console(handler: logging.Handler) -> bool:
    """A plain stream handler: Lightning's and Hydra's consoles (not a file handler, nor pytest's capture)."""
    return type(handler) is logging.StreamHandler


def log_to_run_file() -> logging.Logger:
    """Send the run's log lines (Lightning's, hence the stage headlines and closing lines) to the run folder's log
    file as well as the console, and return the logger for ldm's own lines there.

    Hydra writes ``<run>/<script>.log`` through a file handler on the root logger. Lightning's logger propagates to
    the root when the root had handlers at its import (train.py's order), and then its lines reach the file already;
    otherwise it does not, and the file handlers are added to it. The console keeps Lightning's plain lines, once:
    the root's console handlers skip the records Lightning's own console handler prints.
    """
    for logger, handler in _added:
        logger.removeHandler(handler)
    _added.clear()
    for handler in _filtered:
        handler.filters[:] = [f for f in handler.filters if not isinstance(f, _NotLightningsOwn)]
    _filtered.clear()
    for handler in logging.getLogger().handlers:
        if _is_console(handler):
            handler.addFilter(_NotLightningsOwn())
            _filtered.append(handler)
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    run_log = logging.getLogger("ldm.run")
    run_log.setLevel(logging.INFO)
    run_log.propagate = False
    for logger in (logging.getLogger("lightning.pytorch"), logging.getLogger("lightning.fabric"), run_log):
        if logger.propagate:  # its lines reach the root's file handlers: another would write each line twice
            continue
        for handler in files:
            if handler not in logger.handlers:
                logger.addHandler(handler)
                _added.append((logger, handler))
    return run_log
