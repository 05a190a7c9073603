"""Check a list of commands without running them: each script imports and its arguments parse, and nothing else.

`bench/gpu_checks.sh`'s dry run (``GPU_CHECKS_DRY_RUN=1``) writes the commands it would run on a GPU to a file
instead of running them, then calls this, so a machine without a GPU can check that every command still names
existing scripts, flags and choices. A bench script or ``python -m`` module runs up to its ``parse_args``;
``train.py``'s overrides are composed by Hydra and checked by ``ldm.lightning.settings.check_run``, as the run would
check them before its first stage (``sample.py``'s are composed). Prints ``ok`` or ``FAIL`` (with the reason) per
command; exits 1 if any failed.

    python bench/parse_only.py COMMANDS_FILE    # one shell-quoted `python3 ...` command per line
"""

from __future__ import annotations

import argparse
import contextlib
import io
import runpy
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Parsed(Exception):
    """Raised by the patched ``parse_args`` once a script's arguments have parsed."""


@contextlib.contextmanager
def _stop_after_parsing() -> Iterator[None]:
    """``ArgumentParser.parse_args`` parses, then raises ``Parsed`` instead of returning."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def _one_job(overrides: list[str]) -> list[str]:
    """A multirun's overrides with each sweep (``a=1,2``, ``range(...)``) cut to its first value: one job's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    job = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            job.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        else:
            job.append(override.input_line)
    return job


def _check_hydra_app(config: str, overrides: list[str], run_checks: bool) -> None:
    """Compose a Hydra app's config (``train`` or ``sample``) from ``overrides``, the first job of a multirun; with
    ``run_checks``, check a training run's config as train.py would before its first stage."""
    from hydra import compose, initialize_config_dir

    multirun = {"-m", "--multirun"}
    overrides = _one_job([o for o in overrides if o not in multirun])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config, overrides=overrides, return_hydra_config=True)
    if run_checks and config == "train":
        from ldm.lightning.settings import check_run

        check_run(cfg)


def _check_parse(target: str, args: list[str], module: bool) -> None:
    """Run ``target`` (a script's path, or a module's name) as ``__main__`` up to its argument parsing."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [target, *args]
    if not module:  # as `python SCRIPT`: the script's folder heads sys.path
        sys.path.insert(0, str((ROOT / target).parent))
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / target), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise RuntimeError("the command ended without parsing arguments")


def _torchrun_target(args: list[str]) -> list[str]:
    """The ``python`` command torchrun would start on each rank, after torchrun's own parser has read ``args`` (it
    reads them all, the script's included: an abbreviation of its options there is an error)."""
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(args)
    return ["python", *(["-m"] if parsed.module else []), parsed.training_script, *parsed.training_script_args]


def _last_line(stderr: io.StringIO, default: str) -> str:
    """What a parser printed last (its error), else ``default``."""
    lines = stderr.getvalue().strip().splitlines()
    return lines[-1] if lines else default


def check(command: list[str], run_checks: bool = True) -> str | None:
    """None if ``command`` (``python3 SCRIPT|-m MODULE ARGS...``, or ``torchrun ... SCRIPT|-m MODULE ARGS...``) would
    start, else why not. ``run_checks=False`` composes train.py's config without the run's checks, which look for the
    files a command names."""
    if command and command[0] == "torchrun":
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                command = _torchrun_target(command[1:])
        except SystemExit:
            return f"torchrun: {_last_line(stderr, 'its arguments do not parse')}"
    if not command or not command[0].startswith("python"):
        return "not a python command"
    rest = command[1:]
    module = bool(rest) and rest[0] == "-m"
    if len(rest) < 1 + module:
        return "no script or module named"
    target, args = (rest[1], rest[2:]) if module else (rest[0], rest[1:])
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), _stop_after_parsing():
            if target in ("train.py", "sample.py"):
                _check_hydra_app(target[: -len(".py")], args, run_checks)
                return None
            _check_parse(target, args, module)
    except Parsed:
        return None
    except SystemExit as exit_:  # argparse's error
        return _last_line(stderr, f"exit {exit_.code}")
    except Exception as err:  # a script or module that does not import, an override Hydra or check_run refuses
        return f"{type(err).__name__}: {err}"
    return None


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/parse_only.py COMMANDS_FILE")
    failed = 0
    for line in Path(sys.argv[1]).read_text().splitlines():
        if not line.strip():
            continue
        reason = check(shlex.split(line))
        failed += reason is not None
        print(f"ok   {line}" if reason is None else f"FAIL {line}\n     {reason}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
