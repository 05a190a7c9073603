"""Every command the README and the guides show in their shell blocks still starts: its script or module imports and
its arguments parse, and train.py's and sample.py's overrides compose (the first job of a sweep), by
bench/parse_only.py. Nothing runs: a placeholder such as ``CKPT`` is taken as it is, and ``<date>`` as ``date`` (what
a user would type in its place)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bench.parse_only import check

ROOT = Path(__file__).resolve().parents[2]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # not docs/experiments: dated records
FENCE = re.compile(r"^\s*```(\w*)")
NOT_OURS = [("-c",), ("-m", "pytest"), ("-m", "venv"), ("-m", "pip")]  # python's own, pytest's, pip's


def shell_commands(text: str) -> list[str]:
    """The python and torchrun commands of ``text``'s bash/sh blocks: continued lines joined, ``&&`` chains split,
    anything before ``python`` (``srun``) dropped."""
    commands, block, lines = [], None, []
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence:
            block = None if block is not None else fence.group(1)
            continue
        if block in ("bash", "sh"):
            lines.append(line.strip())
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(re.sub(r"<(\w+)>", r"\1", part), comments=True)
            start = next((i for i, w in enumerate(words) if re.fullmatch(r"python3?|torchrun", w)), None)
            if start is None:
                continue
            words = words[start:]
            if any(tuple(words[1:1 + len(p)]) == p for p in NOT_OURS):
                continue
            commands.append(shlex.join(words))
    return commands


COMMANDS = [(path.relative_to(ROOT).as_posix(), c) for path in GUIDES for c in shell_commands(path.read_text())]


def test_the_guides_show_commands():
    files = {f for f, _ in COMMANDS}
    assert len(COMMANDS) >= 60 and {"README.md", "docs/training.md", "docs/sampling.md", "docs/performance.md"} <= files


@pytest.mark.parametrize(("guide", "command"), COMMANDS, ids=[f"{f}:{c[:60]}" for f, c in COMMANDS])
def test_a_guides_command_starts(guide, command):
    reason = check(shlex.split(command), run_checks=False)
    assert reason is None, f"{guide}: `{command}` would not start: {reason}"


def test_a_command_that_would_not_start_is_found():
    commands = shell_commands("```bash\npython bench/unet.py --config tiny \\\n    --no-such-flag   # a comment\n"
                              "srun python train.py -m unet=nope,tiny && python -m pytest\n```\n"
                              "python train.py outside=a_block\n")
    assert commands == ["python bench/unet.py --config tiny --no-such-flag", "python train.py -m unet=nope,tiny"]
    assert "unrecognized arguments: --no-such-flag" in check(shlex.split(commands[0]))
    assert "Could not find 'unet/nope'" in check(shlex.split(commands[1]), run_checks=False)  # a sweep's first job
    assert check(shlex.split("python train.py -m unet=tiny,small"), run_checks=False) is None


def test_a_torchrun_command_is_read_by_torchruns_parser_first():
    """torchrun's parser reads every argument: ``--n`` is an ambiguous abbreviation of its options, so ldm.eval.generate
    takes ``--num-images`` there; the script's own arguments are then checked as under python."""
    flags = ("--captions c.txt --out o --seed 1 --batch-size 2 --steps 3 --guidance 2 --sampler ddim --dtype bf16 "
             "--no-ema --compile --device cpu")  # every option of ldm.eval.generate but the count
    launch = "torchrun --nproc-per-node 2 -m ldm.eval.generate CKPT"
    assert check(shlex.split(f"{launch} --num-images 8 {flags}")) is None
    assert "ambiguous option: --n" in check(shlex.split(f"{launch} --n 8 {flags}"))
    assert check(shlex.split(f"python -m ldm.eval.generate CKPT --n 8 {flags}")) is None
    assert "unrecognized arguments: --nope" in check(shlex.split(f"{launch} --num-images 8 --nope {flags}"))
