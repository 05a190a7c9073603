"""trainer=ddp_cpu: two processes over gloo train both stages (the VAE with its PatchGAN) end to end on shards and
finish with the same weights."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.integration.tiny_run import ROOT, TINY_MODELS, train_env

# train.py with a probe callback added to every stage's trainer. Lightning's DDP launcher re-runs this very script
# (same argv) for rank 1, so both ranks carry the probe: at the start it records the weights, on every batch the
# sample keys, at the end the weights again, into STAGE_DIR/probe_rank{R}.pt.
PROBE = textwrap.dedent(
    f"""
    import hydra
    import lightning as L
    import torch
    from ldm.lightning import stages

    class Probe(L.Callback):
        def __init__(self, out):
            self.out, self.keys = out, []

        def on_train_start(self, trainer, pl_module):
            self.start = {{k: v.detach().clone() for k, v in pl_module.state_dict().items()}}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.keys.append(list(batch["key"]))

        def on_train_end(self, trainer, pl_module):
            end = {{k: v.detach().clone() for k, v in pl_module.state_dict().items()}}
            torch.save({{"start": self.start, "end": end, "keys": self.keys, "world_size": trainer.world_size}},
                       self.out / f"probe_rank{{trainer.global_rank}}.pt")

    make_trainer = stages.make_trainer

    def probed(cfg, stage_dir, max_steps, callbacks, logger, manual=False):
        return make_trainer(cfg, stage_dir, max_steps, [*callbacks, Probe(stage_dir)], logger, manual)

    stages.make_trainer = probed
    if __name__ == "__main__":
        hydra.main(config_path={str(ROOT / "conf")!r}, config_name="train", version_base="1.3")(stages.run)()
    """
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Both stages under trainer=ddp_cpu with the probe: the run folder (shards in its parent's shards/)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    script = tmp_path / "train_probe.py"
    script.write_text(PROBE)
    run = tmp_path / "run"
    cmd = [sys.executable, str(script), f"hydra.run.dir={run}", f"data.train_shards={tmp_path / 'shards'}",
           *TINY_MODELS, "trainer=ddp_cpu", "trainer.log_every_n_steps=1", "vae_stage.max_steps=3",
           "vae_stage.disc_start=1", "vae_stage.disc_layers=2",  # the PatchGAN: its gradients averaged by hand
           "ldm_stage.max_steps=4", "callbacks.ldm.checkpoint.every_n_train_steps=2", "ldm_stage.ema_decay=0.9",
           "ldm_stage.cache_latents=false"]  # the quickstart's in-run cache is single-process
    proc = subprocess.run(cmd, cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return run


def test_two_cpu_ranks_train_both_stages_to_identical_weights(ddp_run):
    run, tmp_path = ddp_run, ddp_run.parent
    for stage, steps, prefix in (("vae", 3, "vae."), ("ldm", 4, "unet.")):
        r0, r1 = (torch.load(run / stage / f"probe_rank{r}.pt", weights_only=False) for r in (0, 1))
        assert r0["world_size"] == r1["world_size"] == 2
        # each rank read its own part of the shards ...
        assert len(r0["keys"]) == len(r1["keys"]) == steps
        seen0, seen1 = ({k for b in r["keys"] for k in b} for r in (r0, r1))
        assert seen0 and not seen0 & seen1, stage
        # ... yet, with gradients averaged over ranks, both end with identical weights (and EMA), which moved
        assert r0["end"].keys() == r1["end"].keys()
        for k in r0["end"]:
            assert torch.equal(r0["end"][k], r1["end"][k]), f"{stage}: {k} differs between ranks"
        trained = [k for k in r0["end"] if k.startswith(prefix) and r0["end"][k].is_floating_point()]
        assert any(not torch.equal(r0["start"][k], r0["end"][k]) for k in trained), f"{stage}: weights did not move"
        if stage == "vae":  # the discriminator trained (steps 1 and 2) and its BatchNorm statistics moved
            for kind in ("weight", "running_mean"):
                disc = [k for k in r0["end"] if k.startswith("discriminator.") and k.endswith(kind)]
                assert disc and any(not torch.equal(r0["start"][k], r0["end"][k]) for k in disc), kind
        if stage == "ldm":
            assert int(r0["end"]["ema.num_updates"]) == steps
            assert any(not torch.equal(r0["start"][k], r0["end"][k]) for k in r0["end"]
                       if k.startswith("ema.") and k != "ema.num_updates")

    # rank 0 alone wrote the checkpoints, configs and logs; the final checkpoint holds rank 1's weights too
    assert (run / "vae" / "vae.ckpt").is_file() and (run / "ldm" / "config.yaml").is_file()
    last = torch.load(run / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4 and len(last["train_generators"]) == 2  # one training generator per rank
    assert not torch.equal(last["train_generators"][0], last["train_generators"][1])
    r1 = torch.load(run / "ldm" / "probe_rank1.pt", weights_only=False)
    for k, v in last["state_dict"].items():
        assert torch.equal(v, r1["end"][k]), k
    assert not (tmp_path / "outputs").exists()  # rank 1 reused rank 0's run directory (no Hydra dir of its own)
    assert (run / "ldm" / "checkpoints" / "step000004.ckpt").is_file()
    assert not any(p.name.endswith(".tmp") for p in run.rglob("*"))


def test_two_cpu_ranks_train_the_same_lora_adapters_on_a_frozen_base(ddp_run, tmp_path):
    """ldm_stage.lora under DDP: on an ldm checkpoint as init_ckpt (the run above's), both ranks end with the same
    adapters, which moved, while every base weight stays as the base checkpoint's."""
    base = ddp_run / "ldm" / "checkpoints" / "last.ckpt"
    script = ddp_run.parent / "train_probe.py"
    run = tmp_path / "lora"
    cmd = [sys.executable, str(script), f"hydra.run.dir={run}", f"data.train_shards={ddp_run.parent / 'shards'}",
           *TINY_MODELS, "trainer=ddp_cpu", "stages=[ldm]", f"+init_ckpt={base}", "ldm_stage.lora.rank=4",
           "ldm_stage.lora.targets=[attention,proj]", "optimizer.lr=1e-2", "ldm_stage.max_steps=3",
           "ldm_stage.cache_latents=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    r0, r1 = (torch.load(run / "ldm" / f"probe_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert len(r0["keys"]) == len(r1["keys"]) == 3
    assert r0["end"].keys() == r1["end"].keys()
    for k in r0["end"]:
        assert torch.equal(r0["end"][k], r1["end"][k]), f"{k} differs between ranks"
    adapters = [k for k in r0["end"] if ".lora_" in k]
    frozen = [k for k in r0["end"] if k.startswith(("unet.", "text_encoder.")) and ".lora_" not in k
              and r0["end"][k].is_floating_point()]
    assert adapters and frozen
    assert any(not torch.equal(r0["start"][k], r0["end"][k]) for k in adapters)
    assert all(torch.equal(r0["start"][k], r0["end"][k]) for k in frozen)
    last = torch.load(run / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert set(last["state_dict"]) == {k for k in adapters if k in last["state_dict"]}
    for k, v in last["state_dict"].items():
        assert torch.equal(v, r1["end"][k]), k
