"""Train ldm: the autoencoder stage, then the latent diffusion stage.

    python train.py                                  # the quickstart: shapes, 32 px, CPU, 5-30 minutes by CPU
    python train.py experiment=mnist_pixel_ddpm      # another preset
    python train.py -m optimizer.lr=1e-4,3e-4 unet=tiny,small   # a sweep, one directory per job
    python train.py resume=last|auto|RUN|PATH        # exact resume (optimizer, EMA, LR, data position, RNG)

The config is composed from conf/ (one group per swappable part); ldm.lightning.stages assembles and runs it.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ldm.errors import ConfigError
from ldm.host_memory import keep_freed_host_memory
from ldm.lightning.run_log import log_to_run_file
from ldm.lightning.settings import check_run


def _wrong_input(log: logging.Logger, err: ConfigError) -> None:
    """A wrong input: its message in the run's log and on stderr, no traceback, exit status 2. In a sweep (``-m``)
    the error is raised instead: Hydra marks that job failed and runs the others (an exit would end the sweep)."""
    log.error(f"error: {err}")
    print(f"error: {err}", file=sys.stderr)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise err
    sys.exit(2)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    keep_freed_host_memory()  # each step reuses the memory the last one freed (no page faults)
    log = log_to_run_file()
    try:
        check_run(cfg)  # before Lightning is imported (seconds, with torchmetrics): a wrong input is reported at once
    except ConfigError as err:
        _wrong_input(log, err)
    from ldm.lightning.console import quiet_known_warnings
    from ldm.lightning.preemption import Preempted
    from ldm.lightning.stages import run

    quiet_known_warnings()
    try:
        run(cfg, checked=True)
    except ConfigError as err:
        _wrong_input(log, err)
    except Preempted as stop:  # SIGTERM or the pre-timeout signal: the state is saved; non-zero, as the job ended early
        log.warning(str(stop))
        print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
