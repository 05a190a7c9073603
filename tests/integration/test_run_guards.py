"""Guards around a training run: the whole config is checked before any work, one training per run folder, resume
within a run folder (a corrupt checkpoint falls back to the previous one, a finished run says so), and wrong inputs
end in one line and exit status 2, not a traceback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.errors import ConfigError
from ldm.lightning import stages
from ldm.lightning.run_lock import LOCK_NAME, RunLock
from tests.integration.tiny_run import ROOT, read_metrics, run_train, train_env


def _compose(run: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"out_dir={run}", "logger=csv", "dataset=null",
                                           f"data.train_shards={run / 'no_shards'}", *overrides])


@pytest.mark.parametrize("override,message", [
    ("ldm_stage.max_steps=abc", r"ldm_stage.max_steps must be an integer, got 'abc'"),
    ("vae_stage.max_steps=0", r"vae_stage.max_steps must be >= 1, got 0"),
    ("ldm_stage.caption_dropout=1.5", r"ldm_stage.caption_dropout must be <= 1"),
    ("ldm_stage.lr_schedule=cosin", r"ldm_stage.lr_schedule must be one of"),
    ("sampling.guidance_scale=nan", r"sampling: guidance_scale must be a finite number >= 0 .*got nan"),
    ("sampling.num_inference_steps=0", r"sampling: num_inference_steps must be an integer >= 1"),
    ("vae_ckpt=/nonexistent/vae.ckpt", r"vae_ckpt=/nonexistent/vae.ckpt: no such file"),
    ("+trainer.progress_bar_refresh_steps=0", r"trainer.progress_bar_refresh_steps must be >= 1, got 0"),
    ("diffusion.loss_weighting=minsnr", r"diffusion: unknown loss weighting 'minsnr'"),
    ("diffusion.offset_noise=nan", r"diffusion: offset_noise must be a finite number >= 0, got nan"),
    ("+diffusion.objective=flow-matching", r"diffusion.objective='flow-matching': use diffusion .* or flow_matching"),
    ("first_stage=pixl", r"first_stage must be one of \['vae', 'pixel'\], got 'pixl'"),
    ("optimizer.lr=-1", r"optimizer.lr must be > 0.0, got -1"),
    ("optimizer.betas=[0.9]", r"optimizer.betas must be two numbers in \[0, 1\)"),
    ("optimizer.betas=[0.9,1.5]", r"optimizer.betas\[1\] must be < 1, got 1.5"),
    ("unet.num_heads=512", r"unet: num_heads=512 cannot split an attention level of 64 channels"),
    ("unet.channel_mult=[1,1.5]", r"unet: channel_mult must hold integers >= 1"),
    ("+unet.num_head=4", r"unet: .*num_head"),
    ("data.image_size=30", r"data.image_size=30 is not a multiple of the autoencoder's downsampling factor 4"),
    ("data.image_mode=L", r"data.image_mode=L gives 1-channel images, but autoencoder.in_channels=3"),
    ("stages=ldm", r"stages must be a list, got the string 'ldm': write stages=\[ldm\]"),
])
def test_every_stage_is_checked_before_any_work(tmp_path: Path, override: str, message: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        stages.run(_compose(tmp_path / "run", override))
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "run").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("stages_override,earlier,refused", [
    ("stages=[vae,ldm]", "ldm/checkpoints/last.ckpt", True),
    ("stages=[vae,ldm]", "vae/vae.ckpt", True),
    ("stages=[vae]", "vae/checkpoints/step000500.ckpt", True),
    ("stages=[ldm]", "vae/vae.ckpt", False),  # the ldm stage of a vae trained in this folder: a new stage
    ("stages=[vae,ldm]", "damaged:ldm/checkpoints/last.ckpt", False),  # no run to continue: resume=auto starts too
])
def test_a_fresh_run_is_refused_in_a_folder_that_holds_one(tmp_path: Path, stages_override: str, earlier: str,
                                                            refused: bool, monkeypatch) -> None:
    """A fresh run in an earlier run's folder left that run's model in last.ckpt (the new one went to last-v1.ckpt)
    and reported it as its own."""
    run = tmp_path / "run"
    damaged = earlier.startswith("damaged:")
    earlier = earlier.removeprefix("damaged:")
    (run / earlier).parent.mkdir(parents=True)
    if damaged:
        (run / earlier).write_bytes(b"truncated")
    else:
        torch.save({"global_step": 3}, run / earlier)
    before = (run / earlier).read_bytes()
    reached = []
    monkeypatch.setattr(stages, "_run_stages", lambda *args: reached.append(args))
    overrides = [stages_override] + ([f"vae_ckpt={run / earlier}"] if stages_override == "stages=[ldm]" else [])
    cfg = _compose(run, *overrides)
    if refused:
        hint = r".*stages=\[ldm\] vae_ckpt=" if earlier == "vae/vae.ckpt" else r"$"
        with pytest.raises(ConfigError, match=rf"{run} already holds a run \({earlier}\): continue it with "
                                              rf"resume=last, or give this run another folder.*{hint}"):
            stages.run(cfg)
        assert not reached and (run / earlier).read_bytes() == before
    else:
        stages.run(cfg)
        assert len(reached) == 1


def test_a_logger_whose_package_is_missing_is_named_with_its_install_command(tmp_path: Path, monkeypatch) -> None:
    """logger=tensorboard (documented) failed with a ModuleNotFoundError when the stage built its logger."""
    import importlib.util

    from omegaconf import OmegaConf

    from ldm.lightning import settings

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    logger = OmegaConf.load(ROOT / "conf" / "logger" / "tensorboard.yaml")
    with pytest.raises(ConfigError, match=r"needs tensorboard or tensorboardX, which is not installed: pip install -e "
                                          r"'.\[tensorboard\]', or logger=csv"):
        settings.check_logger(logger)
    settings.check_logger(OmegaConf.load(ROOT / "conf" / "logger" / "csv.yaml"))  # nothing to install


def test_run_checks_the_config_unless_its_caller_did(tmp_path: Path, monkeypatch) -> None:
    """stages.run checks the config itself; train.py checks it before importing Lightning and passes checked=True,
    so the check (which reads the evaluations' reference files) runs once."""
    calls = []

    class Stop(Exception):
        pass

    def stop(cfg):
        raise Stop

    monkeypatch.setattr(stages, "check_run", calls.append)
    monkeypatch.setattr(stages, "find_resume", stop)
    cfg = _compose(tmp_path / "run")
    for checked, expected in ((False, 1), (True, 1)):
        with pytest.raises(Stop):
            stages.run(cfg, checked=checked)
        assert len(calls) == expected


def test_a_wrong_input_prints_one_line_and_exits_2_before_lightning_is_imported(tmp_path: Path) -> None:
    """train.py as a user runs it (as __main__), in a harness that reports its exit status and whether Lightning
    was imported: the config check comes first, so a wrong input is reported without Lightning's seconds of
    imports."""
    args = [str(ROOT / "train.py"), "ldm_stage.max_steps=abc", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"]
    harness = ("import runpy, sys\n"
               f"sys.argv = {args!r}\n"
               "try:\n"
               f"    runpy.run_path({args[0]!r}, run_name='__main__')\n"
               "except SystemExit as stop:\n"
               "    print('exit', stop.code, 'lightning' in sys.modules, 'torchmetrics' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", harness], env=train_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.splitlines()[-1] == "exit 2 False False", proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: ldm_stage.max_steps must be an integer, got 'abc'"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "ldm_stage.max_steps must be an integer" in (tmp_path / "run" / "train.log").read_text()  # logged too


def test_images_too_small_for_the_patchgan_are_refused_before_training(tmp_path: Path) -> None:
    """At disc_start, possibly hours in, the discriminator would fail on them: the check names both settings."""
    with pytest.raises(ConfigError, match=r"vae_stage.disc_layers=4 needs images of at least 48 px, and "
                                          r"data.image_size=32: lower vae_stage.disc_layers or raise data.image_size"):
        stages.run(_compose(tmp_path / "run", "vae_stage.disc_start=5000", "vae_stage.disc_layers=4"))
    stages.check_run(_compose(tmp_path / "run", "vae_stage.disc_start=5000", "vae_stage.disc_layers=3"))
    assert not (tmp_path / "run").exists()



@pytest.mark.parametrize("overrides,message", [
    (["text_encoder=clip_vit_l14", "text_encoder.pretrained_path=/nonexistent/clip"],
     r"text_encoder.pretrained_path=/nonexistent/clip: no such folder with config.json"),
    (["text_encoder=openclip_vit_h14", "text_encoder.pretrained=/nonexistent/vit_h14.bin"],
     r"text_encoder.pretrained=/nonexistent/vit_h14.bin: no such file"),
])
def test_a_text_encoders_missing_weights_are_named_before_the_vae_stage_trains(tmp_path: Path, overrides: list,
                                                                               message: str) -> None:
    """The ldm stage builds the text encoder after the vae stage: its local weights are checked before that."""
    with pytest.raises(ConfigError, match=message):
        stages.run(_compose(tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,message", [
    (["data.buckets={pixels: 1024, size: 32}", "ldm_stage.cache_latents=false"],
     r"data.buckets: unknown keys \['size'\]"),
    (["data.image_mode=CMYK"], r"data.image_mode='CMYK' is not an image mode the reader converts to"),
])
def test_a_refused_data_setting_is_a_config_error_not_a_hydra_traceback(tmp_path: Path, overrides: list,
                                                                         message: str) -> None:
    """The DataModule refuses some settings as it is built; train.py prints those in one line and exits 2, as the
    config check's (Hydra would wrap them in an InstantiationException, a multi-line report and exit 1)."""
    with pytest.raises(ConfigError, match=message):
        stages.run(_compose(tmp_path / "run", *overrides))

CHECK_CASES = [  # overrides (space-separated), and the error check_run reports (None: the config passes)
    ("seed=-1", "seed must be >= 0, got -1"),
    ("preemption.signal=SIGFOO", "preemption.signal='SIGFOO' is not a signal"),
    ("preemption.check_every_n_steps=0", "preemption.check_every_n_steps must be >= 1, got 0"),
    ("+trainer.progress_bar_refresh_steps=0", "trainer.progress_bar_refresh_steps must be >= 1, got 0"),
    ("ldm_stage.max_steps=abc", "ldm_stage.max_steps must be an integer, got 'abc'"),
    ("vae_stage.disc_layers=0", "vae_stage.disc_layers must be >= 1, got 0"),
    ("vae_stage.scale_equivariance=-1", "vae_stage.scale_equivariance must be >= 0"),
    ("vae_stage.scale_equivariance=0.25", None),  # 32 px: 8 latent pixels, pooled to 4
    ("vae_stage.scale_equivariance=0.25 data.image_size=36",
     "data.image_size=36 gives 9 latent pixels: use a multiple of 8 px or set vae_stage.scale_equivariance=0"),
    ("stages=[ldm]", "the ldm stage needs an autoencoder: set vae_ckpt=PATH"),
    ("callbacks.ldm.samples.class_labels=3", "class_labels=3 but the UNet has no classes"),
    ("unet.num_classes=10 callbacks.ldm.samples.class_labels=[1,10]",
     "class_labels: [10] are not classes of the UNet (integers in [0, 10)"),
    ("unet.num_classes=10 callbacks.ldm.samples.class_labels=9", None),
    ("seed=0", None),  # the default config, whose evaluation callback is off
]


def test_the_config_check_needs_lightning_only_for_an_enabled_evaluation(tmp_path: Path) -> None:
    """check_run's errors come without Lightning's seconds of imports (train.py runs it first); only an enabled
    evaluation is checked by building its callback. The cases run in one fresh process."""
    code = ("import sys\n"
            "from hydra import compose, initialize_config_dir\n"
            "from ldm.errors import ConfigError\n"
            "from ldm.lightning.settings import check_run\n"
            f"with initialize_config_dir(config_dir={str(ROOT / 'conf')!r}, version_base='1.3'):\n"
            f"    for override in {[o for o, _ in CHECK_CASES]!r}:\n"
            f"        cfg = compose('train', overrides=['out_dir={tmp_path}', 'logger=csv', *override.split()])\n"
            "        try:\n"
            "            check_run(cfg)\n"
            "            print('passed')\n"
            "        except ConfigError as err:\n"
            "            print('error', err)\n"
            "print('lightning' in sys.modules, 'torchmetrics' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=train_env(), capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert len(lines) == len(CHECK_CASES) + 1, proc.stdout + proc.stderr[-3000:]
    for line, (override, expected) in zip(lines, CHECK_CASES, strict=False):  # the last line: the imports
        assert (line == "passed") if expected is None else (line.startswith("error") and expected in line), override
    assert lines[-1] == "False False"


def test_one_training_per_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(f'{{"pid": {os.getpid()}, "host": "{os.uname().nodename}"}}')
    with pytest.raises(ConfigError, match=rf"in use by another training \(PID {os.getpid()} on "):
        stages.run(_compose(run, "stages=[]"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_NAME).write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}"}}')
    with pytest.warns(UserWarning, match=f"taking over the lock of PID {dead.pid}"):
        assert stages.run(_compose(run, "stages=[]")) == {}
    assert not (run / LOCK_NAME).exists()  # released at the end of the run
    with RunLock(run) as lock, pytest.raises(ConfigError, match="in use"), RunLock(run):
        assert lock.held


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock(tmp_path: Path, monkeypatch) -> None:
    """A SLURM job killed while it held the lock (past the grace time, out of memory, a lost node) and requeued onto
    another node finds its own lock, which it cannot test for life there: the job id says it is its own. Another
    job's lock still refuses."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    with RunLock(run):
        assert json.loads((run / LOCK_NAME).read_text())["slurm_job"] == "4242"
    (run / LOCK_NAME).write_text('{"pid": 1, "host": "node-a", "slurm_job": "4242"}')
    with pytest.warns(UserWarning, match=r"taking over the lock of PID 1 on node-a, an earlier run of this SLURM job"):
        with RunLock(run) as lock:
            assert lock.held
    (run / LOCK_NAME).write_text('{"pid": 1, "host": "node-a", "slurm_job": "777"}')
    with pytest.raises(ConfigError, match=r"in use by another training \(PID 1 on node-a"):
        RunLock(run).__enter__()


def test_the_run_lock_takes_over_once_and_only_from_what_is_gone(tmp_path: Path, monkeypatch) -> None:
    """A former process with this PID (a container restart), an empty lock left long ago: taken over. A live step
    of the same SLURM job on this host: refused. Two takers of one stale lock: one wins, the other is refused, and
    the winner's lock survives the loser."""
    import socket
    import time as clock

    from ldm.lightning import run_lock

    run = tmp_path / "run"
    run.mkdir()
    host = socket.gethostname()
    (run / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": host, "slurm_job": None, "started": 0}))
    with pytest.warns(UserWarning, match="no longer running"), RunLock(run) as lock:
        assert lock.held
    (run / LOCK_NAME).write_text("")
    with pytest.raises(ConfigError, match="in use by another training"):  # maybe being written right now
        RunLock(run).__enter__()
    old = clock.time() - 2 * run_lock.EMPTY_LOCK_GRACE_S
    os.utime(run / LOCK_NAME, (old, old))
    with pytest.warns(UserWarning, match="empty or unreadable"), RunLock(run) as lock:
        assert lock.held
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": host, "slurm_job": "4242"}))
        with pytest.raises(ConfigError, match=rf"in use by another training \(PID {live.pid}"):
            RunLock(run).__enter__()
    finally:
        live.kill()
        live.wait()
    # two takers: B has judged the lock stale when A takes it over first
    (run / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": host, "slurm_job": None}))
    a, b = RunLock(run), RunLock(run)
    real = run_lock.warnings.warn

    def a_first(*args, **kwargs):
        monkeypatch.setattr(run_lock.warnings, "warn", real)
        a.__enter__()

    monkeypatch.setattr(run_lock.warnings, "warn", a_first)
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="another process took the run folder's lock"):
        b.__enter__()
    assert a.held and not b.held and json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    b.__exit__(None, None, None)
    assert (run / LOCK_NAME).exists()
    a.__exit__(None, None, None)
    assert not (run / LOCK_NAME).exists()


def _fake_ckpt(path: Path, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ldm": {"kind": "latent_diffusion"}, "global_step": step, "loops": {}, "state_dict": {}}, path)


def test_resume_finds_the_newest_loadable_checkpoint_of_the_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"resume=last: no loadable checkpoint in .*hydra.run.dir=RUN resume=last"):
        stages.find_resume(_compose(run, "resume=last"))
    ckpts = run / "ldm" / "checkpoints"
    _fake_ckpt(ckpts / "step000004.ckpt", 4)
    (ckpts / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")  # a write cut short
    with pytest.warns(UserWarning, match=r"last.ckpt does not load .*trying the previous checkpoint"):
        found = stages.find_resume(_compose(run, "resume=last"))
    assert found == ("ldm", str(ckpts / "step000004.ckpt"), 4, None)
    other = tmp_path / "elsewhere"
    with pytest.warns(UserWarning, match="does not load"):
        assert stages.find_resume(_compose(other, f"resume={run}"))[3] == run  # a run folder: continued there
    with pytest.raises(ConfigError, match="no such checkpoint or run folder"):
        stages.find_resume(_compose(run, f"resume={tmp_path / 'nothing.ckpt'}"))


def test_resume_orders_periodic_checkpoints_by_step_past_six_digits(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpts = run / "ldm" / "checkpoints"
    for step in (999_000, 1_000_000, 999_999):
        _fake_ckpt(ckpts / f"step{step:06d}.ckpt", step)
    assert stages.find_resume(_compose(run, "resume=last"))[1:3] == (str(ckpts / "step1000000.ckpt"), 1_000_000)


def test_a_finished_run_says_so_and_trains_nothing(tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    _fake_ckpt(run / "ldm" / "checkpoints" / "last.ckpt", 7)
    with caplog.at_level(logging.INFO):
        assert stages.run(_compose(run, "resume=last", "stages=[ldm]", "ldm_stage.max_steps=7")) == {}
    assert f"the ldm stage of {run} finished at step 7 (max_steps=7): nothing to resume" in caplog.text
    assert not (run / "ldm" / "config.yaml").exists() and not (run / LOCK_NAME).exists()


def test_resume_runs_on_the_runs_config_and_refuses_overrides_that_change_the_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_train(tmp_path, "stages=[vae]", "vae_stage.max_steps=2", run_dir=run)

    def resume(*overrides: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", "resume=last", *overrides]
        return subprocess.run(cmd, cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=300)

    refused = resume("autoencoder.ch_mult=[1,2]", "vae_stage.lr=0.5")
    assert refused.returncode == 2, refused.stderr[-3000:]
    last_line = refused.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: resuming") and "Traceback" not in refused.stderr
    assert "autoencoder.ch_mult (the run has [1, 1, 1], the command line [1, 2])" in last_line
    assert "vae_stage.lr (the run has" in last_line and "start a new run" in last_line

    # None of the run's own overrides (tiny models, its shards, the csv logger) on this command line: the run's
    # saved config supplies them, so its checkpoint loads; max_steps may change.
    ok = resume("vae_stage.max_steps=3")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"resumed from {run / 'vae' / 'checkpoints' / 'last.ckpt'} at step 2" in ok.stderr + ok.stdout
    assert torch.load(run / "vae" / "vae.ckpt", map_location="cpu", weights_only=False)["spec"] is not None
    rows = read_metrics(run / "logs" / "version_0" / "metrics.csv")
    assert sorted(rows) == [0, 1, 2] and not (run / "logs" / "version_1").exists()  # the same logger run


def test_resume_auto_starts_fresh_without_a_checkpoint_and_is_the_default_under_slurm(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    run = tmp_path / "run"
    assert stages.find_resume(_compose(run, "resume=auto")) is None
    _fake_ckpt(run / "ldm" / "checkpoints" / "last.ckpt", 3)
    assert stages.find_resume(_compose(run, "resume=auto"))[:3] == ("ldm", str(run / "ldm/checkpoints/last.ckpt"), 3)
    assert stages.find_resume(_compose(run)) is None  # outside SLURM: no resume unless asked
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert stages.find_resume(_compose(run))[2] == 3
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # an salloc shell is not a batch job
    assert stages.find_resume(_compose(run)) is None


def test_a_checkpoint_is_looked_at_memory_mapped_and_a_legacy_file_still_reads(tmp_path: Path, monkeypatch) -> None:
    """find_resume reads only a checkpoint's step on every rank: memory-mapped, its weights stay in the file. A file
    in torch's pre-zip format cannot be mapped and is read whole."""
    from ldm.checkpoint import read_checkpoint

    state = {"global_step": 3, "state_dict": {"w": torch.arange(6.0)}}
    torch.save(state, tmp_path / "zip.ckpt")
    torch.save(state, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    for name in ("zip.ckpt", "legacy.ckpt"):
        got = read_checkpoint(tmp_path / name, mmap=True)
        assert got["global_step"] == 3 and torch.equal(got["state_dict"]["w"], state["state_dict"]["w"])
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (loads.append(k.get("mmap")), load(*a, **k))[1])
    run = tmp_path / "run"
    _fake_ckpt(run / "ldm" / "checkpoints" / "last.ckpt", 5)
    assert stages.find_resume(_compose(run, "resume=last"))[2] == 5
    assert stages.find_resume(_compose(run, f"resume={run / 'ldm' / 'checkpoints' / 'last.ckpt'}"))[2] == 5
    assert loads == [True, True]


@pytest.mark.parametrize("overrides,message", [
    (["ldm_stage.lora.rank=4"], r"ldm_stage.lora.rank trains adapters on a base model: set init_ckpt=PATH"),
    (["ldm_stage.lora.rank=4", "+init_ckpt=/etc/hostname"],
     r"ldm_stage.lora takes the VAE from init_ckpt .*stages=\[ldm\]"),
    (["ldm_stage.lora.rank=4", "+init_ckpt=/etc/hostname", "stages=[ldm]", "ldm_stage.guide_snapshot_step=0.5"],
     r"ldm_stage.lora does not keep an autoguidance snapshot"),
])
def test_a_lora_run_is_checked_before_the_vae_stage_trains(tmp_path: Path, overrides: list, message: str) -> None:
    """With the default stages=[vae,ldm] a LoRA run was refused only after the whole vae stage had trained."""
    with pytest.raises(ConfigError, match=message):
        stages.run(_compose(tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()


def _base_checkpoint(path: Path, cfg, objective: str | None = None) -> Path:
    """An ldm checkpoint of the composed config's model (random weights), recording the run's own objective, or that
    of the ``diffusion`` preset ``objective``."""
    import torch

    from ldm.autoencoder import AutoencoderKL
    from ldm.checkpoint import describe_ldm
    from ldm.diffusion import SamplingDefaults
    from ldm.lightning.diffusion_module import recorded_objective
    from ldm.lightning.settings import diffusion_objective
    from ldm.text import ScratchTextEncoder
    from ldm.unet import UNet

    diffusion = cfg.diffusion
    if objective is not None:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            diffusion = compose("train", overrides=[f"diffusion={objective}", "out_dir=x"]).diffusion
    schedule, prediction_type = recorded_objective(diffusion_objective(diffusion))
    plain = {name: {k: v for k, v in cfg[name].items() if not k.startswith("_")}
             for name in ("unet", "text_encoder", "autoencoder")}
    unet, text = UNet(**plain["unet"]), ScratchTextEncoder(**plain["text_encoder"])
    vae = AutoencoderKL(**plain["autoencoder"])
    header = describe_ldm(unet=unet, text_encoder=text, first_stage=vae, schedule=schedule,
                          prediction_type=prediction_type, ema=False, sampling=SamplingDefaults.from_dict({}),
                          text_encoder_kwargs=plain["text_encoder"])
    state = {f"{name}.{k}": v for name, part in (("unet", unet), ("text_encoder", text), ("first_stage", vae))
             for k, v in part.state_dict().items()}
    torch.save({"ldm": header, "state_dict": state}, path)
    return path


def test_a_lora_on_a_base_with_fewer_input_channels_is_refused(tmp_path: Path) -> None:
    """unet.in_channels=9 on a 4-channel base widens conv_in with zero weights, which a LoRA run keeps frozen: the
    'inpainting' model would never see the mask. Refused, naming the full fine-tune that widens it."""
    base = _base_checkpoint(tmp_path / "base.ckpt", _compose(tmp_path / "run", "stages=[ldm]"))
    with pytest.raises(ConfigError, match=r"unet.in_channels=9 widens init_ckpt's 4-channel UNet, but ldm_stage.lora"):
        stages.run(_compose(tmp_path / "run", "stages=[ldm]", f"+init_ckpt={base}", "ldm_stage.lora.rank=4",
                            "unet.in_channels=9"))


def test_a_base_trained_on_another_objective_is_refused_for_lora_and_named_for_a_full_fine_tune(tmp_path) -> None:
    """The quickstart's presets train cosine_v; a base trained with epsilon on SD's schedule was fine-tuned
    against the wrong target without a word, and its checkpoint named the run's schedule."""
    base = _base_checkpoint(tmp_path / "base.ckpt", _compose(tmp_path / "run", "stages=[ldm]"), objective="sd_eps")
    run = ("stages=[ldm]", f"+init_ckpt={base}")
    with pytest.raises(ConfigError, match=r"trained with prediction_type 'epsilon', the run's 'v_prediction'; "
                                          r"schedule .*LoRA adapters on a frozen base"):
        stages.run(_compose(tmp_path / "run", *run, "ldm_stage.lora.rank=4"))
    with pytest.warns(UserWarning, match="the fine-tune moves the base to the run's objective"):
        with pytest.raises(ConfigError, match=r"shard .*no_shards.* does not exist"):  # past the check: the shards
            stages.run(_compose(tmp_path / "full", *run))


def test_a_resumed_full_fine_tune_does_not_need_its_base_file(tmp_path: Path) -> None:
    """A full fine-tune's checkpoint holds every weight, and the resumed stage never reads init_ckpt: a moved base
    file no longer refuses the resume. A LoRA run still needs it (its checkpoint holds the adapters only)."""
    from ldm.lightning.settings import check_run

    moved = f"+init_ckpt={tmp_path / 'moved.ckpt'}"
    check_run(_compose(tmp_path / "run", "stages=[ldm]", moved, "resume=last"))
    with pytest.raises(ConfigError, match="moved.ckpt: no such file"):
        check_run(_compose(tmp_path / "run", "stages=[ldm]", moved))
    with pytest.raises(ConfigError, match="moved.ckpt: no such file"):
        check_run(_compose(tmp_path / "run", "stages=[ldm]", moved, "resume=last", "ldm_stage.lora.rank=4"))


@pytest.mark.parametrize("overrides,judge", [
    ([], "judge (shapes): python -m ldm.eval.shapes CKPT"),
    (["experiment=mnist_quickstart"], "judge (mnist): python -m ldm.eval.mnist CKPT"),
    (["experiment=quickstart_inpaint", "init_ckpt=x.ckpt"], "judge (shapes): python -m ldm.eval.shapes_inpaint CKPT"),
    (["experiment=sd15_finetune", "init_ckpt=x.safetensors"], None),  # your own data: no built-in judge
])
def test_the_closing_summary_names_the_datasets_own_judge(tmp_path: Path, overrides: list, judge: str | None) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"out_dir={tmp_path}", *overrides])
    assert stages.judge_lines(cfg, Path("CKPT")) == ([f"  {judge}"] if judge else [])
