"""Experiment presets compose with train.yaml and build; mnist_pixel_ddpm trains; init_ckpt loads an SD single file;
the sweep preset expands to one directory per job; the SLURM launcher preset composes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.convert import init_from_sd, load_sd_checkpoint, save_state_dict, to_sd_state_dict
from ldm.convert.single_file import ema_key
from ldm.data.make_shards import make_shards
from ldm.lightning import stages
from tests.two_ranks import on_two_ranks

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(*overrides: str, hydra_cfg: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def test_every_preset_is_listed_and_composes(tmp_path: Path) -> None:
    assert {"quickstart", "mnist_pixel_ddpm", "vae_kl_f8", "sd15_finetune", "sweep_lr_unet"} <= set(PRESETS)
    for name in PRESETS:
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n"), name
        cfg = _compose(f"experiment={name}", f"out_dir={tmp_path}")
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        assert set(resolved["stages"]) <= {"vae", "ldm"} and resolved["stages"], name
        assert resolved["unet"]["context_dim"] == resolved["text_encoder"]["width"], name


def test_the_quickstart_text_tower_and_its_measured_descendants(tmp_path: Path) -> None:
    # (preset, blocks, tokens, token table trained): the quickstart's tower (text_encoder=scratch_quickstart); mnist
    # keeps the tower it was measured with; the inpainting fine-tune builds the quickstart's, to load its checkpoint
    for name, layers, length, trained in (("quickstart", 1, 12, False), ("mnist_quickstart", 2, 24, True),
                                          ("quickstart_inpaint", 1, 12, False)):
        cfg = _compose(f"experiment={name}", f"out_dir={tmp_path}")
        text = instantiate(cfg.text_encoder)
        assert (len(text.blocks), text.context_length) == (layers, length), name
        assert text.token_embedding.weight.requires_grad is trained, name
        assert all(p.requires_grad for n, p in text.named_parameters() if n != "token_embedding.weight"), name
    # another encoder on the command line replaces the quickstart's tower whole (none of its keys leak into it)
    clip = _compose("text_encoder=clip_vit_l14", "text_encoder.width=32", "text_encoder.config.hidden_size=32",
                    "text_encoder.config.intermediate_size=64", "text_encoder.config.num_hidden_layers=1",
                    "text_encoder.config.num_attention_heads=2", "text_encoder.config.projection_dim=32",
                    f"out_dir={tmp_path}")
    assert type(instantiate(clip.text_encoder)).__name__ == "HFCLIPTextEncoder"


def test_a_resumed_run_keeps_the_constructor_default_of_a_key_its_saved_config_lacks(tmp_path: Path) -> None:
    """A run saved before ``train_token_embedding`` existed was built with the class default (the table trained),
    not with what today's preset sets; other missing keys take today's values."""
    cfg = _compose(f"out_dir={tmp_path}")
    assert cfg.text_encoder.train_token_embedding is False and "seed" in cfg
    saved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    del saved.text_encoder["train_token_embedding"]
    del saved["seed"]
    OmegaConf.save(saved, tmp_path / "config.yaml")
    merged = stages.resume_config(cfg, tmp_path, None)
    assert merged.text_encoder.train_token_embedding is True
    assert merged.seed == cfg.seed and merged.text_encoder.layers == 1


def test_mnist_pixel_ddpm_preset_matches_the_data(tmp_path: Path) -> None:
    cfg = _compose("experiment=mnist_pixel_ddpm", f"out_dir={tmp_path}")
    assert cfg.first_stage == "pixel" and list(cfg.stages) == ["ldm"]
    assert cfg.diffusion.schedule.schedule == "linear" and cfg.diffusion.schedule.num_train_timesteps == 1000
    assert cfg.diffusion.prediction_type == "epsilon"
    assert (cfg.sampling.sampler, cfg.sampling.num_inference_steps) == ("ddpm", 1000)
    assert cfg.dataset.source == "mnist" and cfg.dataset.out == cfg.data.train_shards == "data/mnist"
    channels = {"L": 1, "RGB": 3}[cfg.data.image_mode]
    assert cfg.unet.in_channels == cfg.unet.out_channels == channels == 1
    unet, text = instantiate(cfg.unet), instantiate(cfg.text_encoder)
    context = text.encode(["a handwritten digit seven", ""]).hidden
    x = torch.randn(2, channels, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        assert unet(x, torch.tensor([0, 999]), context).shape == x.shape


def test_vae_kl_f8_preset_builds_the_compvis_recipe(tmp_path: Path) -> None:
    cfg = _compose("experiment=vae_kl_f8", f"out_dir={tmp_path}")
    assert list(cfg.stages) == ["vae"] and cfg.dataset is None and cfg.trainer.accelerator == "gpu"
    s = cfg.vae_stage
    assert (s.rec_loss, s.kl_weight, s.disc_start, list(s.betas)) == ("l1", 5.1e-12, 50001, [0.5, 0.9])
    assert s.lr == pytest.approx(4.5e-6 * s.batch_size)  # CompVis: base lr x batch x 1 GPU
    assert cfg.data.image_size == 256 and OmegaConf.is_missing(cfg.data, "train_shards")
    vae = instantiate(cfg.autoencoder)
    assert vae.downsample_factor == 8 and vae.config["scale_factor"] == 0.18215
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 64, 64)).mode().shape == (1, 4, 8, 8)


def test_sd15_finetune_preset_needs_init_ckpt(tmp_path: Path) -> None:
    cfg = _compose("experiment=sd15_finetune", f"out_dir={tmp_path}")
    assert OmegaConf.is_missing(cfg, "init_ckpt") and list(cfg.stages) == ["ldm"] and cfg.first_stage == "vae"
    assert cfg.unet.model_channels == 320 and cfg.unet.context_dim == 768 == cfg.text_encoder.width
    assert cfg.unet.in_channels == cfg.autoencoder.embed_dim == 4 and cfg.autoencoder.scale_factor == 0.18215
    assert cfg.diffusion.schedule.schedule == "scaled_linear" and cfg.diffusion.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="init_ckpt=PATH is required"):
        stages.run(cfg)


def test_mnist_pixel_ddpm_trains_a_few_steps(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _compose(
        "experiment=mnist_pixel_ddpm", f"out_dir={out}", "~logger", f"data.train_shards={tmp_path / 'mnist'}",
        "dataset.length=48", "dataset.maxcount=16", "ldm_stage.max_steps=3", "ldm_stage.batch_size=4",
        "ldm_stage.warmup_steps=1", "callbacks.ldm.checkpoint.every_n_train_steps=3", "unet.model_channels=32",
        "unet.channel_mult=[1,2]", "unet.attention_resolutions=[2]", "unet.num_res_blocks=1", "unet.num_heads=2",
        "unet.dropout=0.0", "text_encoder.width=32", "text_encoder.layers=1", "text_encoder.heads=2",
        "sampling.num_inference_steps=2", "callbacks.ldm.samples.every_n_steps=0",
        "callbacks.ldm.samples.prompts=[a handwritten digit one]",
        "trainer.log_every_n_steps=1",
    )  # fmt: skip
    results = stages.run(cfg)
    assert len(list((tmp_path / "mnist").glob("*.tar"))) == 3  # the no-`dataset` path: train.py wrote the shards
    ckpt = torch.load(results["ldm"], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["ldm"]["first_stage"] is None
    assert ckpt["ldm"]["sampling"]["sampler"] == "ddpm" and ckpt["ldm"]["sampling"]["image_size"] == 32
    assert ckpt["state_dict"]["unet.input_blocks.0.0.weight"].shape[1] == 1  # one input channel
    grid = next((out / "ldm" / "samples").glob("samples_step*.png"))
    assert grid.stat().st_size > 0


# ------------------------------------------------------------------------------------------------- init_ckpt

TINY_BASE = [
    "experiment=sd15_finetune", "unet=tiny", "autoencoder=tiny", "trainer=cpu", "~logger", "data=shapes",
    "data.image_size=32", "unet.model_channels=32", "unet.use_linear_proj=false", "autoencoder.scale_factor=0.18215",
    "ldm_stage.max_steps=2", "ldm_stage.batch_size=4", "ldm_stage.warmup_steps=1", "ldm_stage.num_workers=0",
    "ldm_stage.gradient_checkpointing=false", "sampling.num_inference_steps=2", "callbacks.ldm.samples.every_n_steps=0",
    "callbacks.ldm.samples.prompts=[a photo]", "trainer.log_every_n_steps=1", "unet.channel_mult=[1,2]",
    "unet.attention_resolutions=[1]",
]  # fmt: skip
TINY_SD = [*TINY_BASE, "text_encoder=scratch_tiny", "text_encoder.width=32", "text_encoder.layers=1",
           "text_encoder.heads=2"]


@pytest.fixture
def sd_file(tmp_path: Path):
    """A tiny random model in the SD single-file layout, with EMA UNet weights that differ from the raw ones."""
    cfg = _compose(*TINY_SD, f"out_dir={tmp_path}", f"init_ckpt={tmp_path / 'x'}")
    unet, ema_unet = _randomize(instantiate(cfg.unet), 0), _randomize(instantiate(cfg.unet), 1)
    vae, text = _randomize(instantiate(cfg.autoencoder), 2), _randomize(instantiate(cfg.text_encoder), 3)
    sd = to_sd_state_dict(unet, vae, text.state_dict())  # our own tower: stored under its own names
    for k, v in to_sd_state_dict(ema_unet, vae).items():
        if k.startswith("model.diffusion_model."):
            sd[ema_key(k)] = v
    path = tmp_path / "tiny_sd.safetensors"
    save_state_dict(sd, path)
    return path, unet, ema_unet, vae, text


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_init_ckpt_loads_ema_unet_vae_and_text_encoder(tmp_path: Path, sd_file) -> None:
    path, unet, ema_unet, vae, text = sd_file
    cfg = _compose(*TINY_SD, f"out_dir={tmp_path}", f"init_ckpt={path}")
    sd = load_sd_checkpoint(path)
    new_unet, new_text = instantiate(cfg.unet), instantiate(cfg.text_encoder)
    assert init_from_sd(sd, str(path), new_unet, new_text) == ["UNet", "text encoder"]
    assert _equal(new_unet, ema_unet) and not _equal(new_unet, unet)  # the EMA weights, when present
    assert _equal(new_text, text)
    new_vae = stages.build_first_stage(cfg, None, None, sd, str(path))
    assert _equal(new_vae, vae) and new_vae.config["scale_factor"] == 0.18215
    assert torch.allclose(new_vae.latent_scale, torch.tensor(0.18215))
    # a checkpoint that stores its own scale_factor (CompVis scale_by_std) wins over the config
    with_scale = tmp_path / "with_scale.safetensors"
    save_state_dict({**to_sd_state_dict(unet, vae, text.state_dict()), "scale_factor": torch.tensor(0.5)}, with_scale)
    scaled = stages.build_first_stage(cfg, None, None, load_sd_checkpoint(with_scale), str(with_scale))
    assert scaled.config["scale_factor"] == 0.5


def test_init_ckpt_loads_an_sd1_clip_text_encoder(tmp_path: Path) -> None:
    """SD 1.x stores CLIP as cond_stage_model.transformer.text_model.*: it lands in our HFCLIPTextEncoder."""
    clip = ["text_encoder=clip_vit_l14", "text_encoder.width=32", "text_encoder.config.hidden_size=32",
            "text_encoder.config.intermediate_size=64", "text_encoder.config.num_hidden_layers=1",
            "text_encoder.config.num_attention_heads=2", "text_encoder.config.projection_dim=32"]
    cfg = _compose(*TINY_BASE, *clip, f"out_dir={tmp_path}", f"init_ckpt={tmp_path / 'x'}")
    unet, vae, text = instantiate(cfg.unet), instantiate(cfg.autoencoder), _randomize(instantiate(cfg.text_encoder), 4)
    path = tmp_path / "sd1.ckpt"
    save_state_dict(to_sd_state_dict(unet, vae, text), path)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in torch.load(path)["state_dict"])
    new_text = instantiate(cfg.text_encoder)
    init_from_sd(load_sd_checkpoint(path), str(path), instantiate(cfg.unet), new_text)
    assert _equal(new_text, text)


def test_init_ckpt_mismatch_is_a_clear_error(tmp_path: Path, sd_file) -> None:
    path = sd_file[0]
    sd = load_sd_checkpoint(path)
    cfg = _compose(*TINY_SD, f"out_dir={tmp_path}", f"init_ckpt={path}", "unet.model_channels=64")
    with pytest.raises(ValueError, match=r"UNet \(unet config vs init_ckpt=.*\) state dict does not match.*shape"):
        init_from_sd(sd, str(path), instantiate(cfg.unet), None)
    cfg = _compose(*TINY_SD, f"out_dir={tmp_path}", f"init_ckpt={path}", "text_encoder.layers=2")
    with pytest.raises(ValueError, match=r"text encoder \(text_encoder config vs init_ckpt=.*\) .* missing keys"):
        init_from_sd(sd, str(path), instantiate(cfg.unet), instantiate(cfg.text_encoder))


def test_init_ckpt_recording_other_heads_is_refused_and_takes_the_runs_where_it_records_none(tmp_path: Path,
                                                                                              sd_file) -> None:
    """The same weights split into other attention heads compute another model: a file whose metadata records heads
    other than the run's config is refused with the setting to change; a file that records none takes the run's."""
    from ldm.checkpoint import load_init_checkpoint
    from ldm.convert import sd_metadata

    path, unet, _, vae, text = sd_file
    cfg = _compose(*TINY_SD, f"out_dir={tmp_path}", f"init_ckpt={path}")
    heads = {"num_heads": cfg.unet.num_heads}
    assert load_init_checkpoint(path, unet_kwargs=heads).unet.config["num_heads"] == cfg.unet.num_heads
    other = _randomize(instantiate(cfg.unet, num_heads=2 * cfg.unet.num_heads), 5)
    recorded = tmp_path / "recorded.safetensors"
    save_state_dict(to_sd_state_dict(other, vae, text.state_dict()), recorded, metadata=sd_metadata(other, vae))
    sd = load_init_checkpoint(recorded, unet_kwargs=heads)
    assert sd.unet.config["num_heads"] == 2 * cfg.unet.num_heads  # the file's, not the run's
    with pytest.raises(ValueError, match=rf"records a UNet with {{'num_heads': {2 * cfg.unet.num_heads}}}.*the run's "
                                         rf"unet config has {{'num_heads': {cfg.unet.num_heads}}}.*Set unet.num_heads="
                                         rf"{2 * cfg.unet.num_heads} unet.num_head_channels=-1"):
        init_from_sd(sd, str(recorded), instantiate(cfg.unet), None)
    same = instantiate(cfg.unet, num_heads=2 * cfg.unet.num_heads)
    init_from_sd(sd, str(recorded), same, None)
    assert _equal(same, other)


def test_init_ckpt_run_trains_from_the_loaded_weights(tmp_path: Path, sd_file) -> None:
    path, _, ema_unet, vae, _ = sd_file
    make_shards("shapes", tmp_path / "shapes", maxcount=8, size=32, length=16, log=None)
    cfg = _compose(*TINY_SD, f"out_dir={tmp_path / 'run'}", f"init_ckpt={path}",
                   f"data.train_shards={tmp_path / 'shapes'}")
    ckpt = torch.load(stages.run(cfg)["ldm"], map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    assert ckpt["global_step"] == 2
    for k, v in vae.state_dict().items():  # the frozen first stage is the file's VAE
        assert torch.equal(state[f"first_stage.{k}"], v)
    assert ckpt["ldm"]["first_stage"]["kwargs"]["scale_factor"] == 0.18215
    moved = [(state[f"unet.{k}"] - v).abs().max().item() for k, v in ema_unet.state_dict().items()]
    assert 0 < max(moved) < 1e-3  # trained for two small steps, starting from the EMA weights
    name, first = next(iter(ema_unet.named_parameters()))
    assert state[f"ema.{name}"].shape == first.shape  # the EMA average under the parameter's own name


def test_fsdp_is_refused_by_the_vae_stage_with_the_way_around(tmp_path: Path) -> None:
    """The vae stage refuses an FSDP strategy (here one CPU process) before fit: no rank launched, no process group
    joined, no step, no checkpoint; and AutoencoderModule.setup refuses it for a Trainer built elsewhere."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import FSDPStrategy

    from ldm.autoencoder import AutoencoderKL
    from ldm.lightning.autoencoder_module import AutoencoderModule

    make_shards("shapes", tmp_path / "shapes", maxcount=8, size=32, length=16, log=None)
    cfg = _compose(f"out_dir={tmp_path}", "trainer=fsdp_cpu", "trainer.devices=1", "dataset=null", "logger=csv",
                   f"data.train_shards={tmp_path / 'shapes'}")
    refusal = r"vae stage cannot train under FSDP.*trainer=ddp or on one device \(stages=\[vae\]\)"
    with pytest.raises(ValueError, match=refusal):
        stages.train_vae(cfg, tmp_path)
    assert not dist.is_initialized()
    assert not (tmp_path / "vae" / "checkpoints").exists() and not (tmp_path / "vae" / "vae.ckpt").exists()

    module = AutoencoderModule(AutoencoderKL(ch=32, ch_mult=(1,), num_res_blocks=1))
    module._trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), global_rank=0)
    with pytest.raises(ValueError, match=refusal):
        module.setup("fit")


# ------------------------------------------------------------------------------------------------- sweeps, SLURM


def test_a_unet_or_diffusion_preset_on_the_command_line_is_taken_as_written(tmp_path: Path) -> None:
    """The quickstart's own settings live in its presets (unet=quickstart, diffusion=quickstart): they were keys merged
    over any choice, so unet=small trained with the quickstart's attention at [1] and diffusion=cosine_v without
    min-SNR."""
    quickstart = _compose(f"out_dir={tmp_path}")
    assert list(quickstart.unet.attention_resolutions) == [1] and quickstart.unet.model_channels == 64
    assert quickstart.diffusion.loss_weighting == "uniform" and quickstart.diffusion.prediction_type == "v_prediction"
    chosen = _compose("unet=small", "diffusion=cosine_v", f"out_dir={tmp_path}")
    for group, name in (("unet", "small"), ("diffusion", "cosine_v")):
        preset = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"))
        preset.pop("context_dim", None)  # set from the text encoder by train.yaml
        got = OmegaConf.to_container(chosen[group])
        assert {k: got[k] for k in preset} == preset, group


def test_sweep_preset_expands_to_one_directory_per_job(tmp_path: Path) -> None:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _compose("experiment=sweep_lr_unet", f"out_dir={tmp_path}", hydra_cfg=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]
    assert len(jobs) == 4
    seen, subdirs = set(), set()
    for num, job in enumerate(jobs):
        c = _compose("experiment=sweep_lr_unet", *job, f"hydra.job.num={num}", hydra_cfg=True)
        seen.add((c.optimizer.lr, c.unet.model_channels))
        subdirs.add(f"{c.hydra.sweep.dir}/{c.hydra.sweep.subdir}")
    assert seen == {(1e-4, 64), (1e-4, 128), (3e-4, 64), (3e-4, 128)}
    assert len(subdirs) == 4  # hydra.sweep.subdir = ${hydra.job.num}


@pytest.mark.slow
def test_sweep_runs_four_jobs_in_four_directories(tmp_path: Path) -> None:
    """The real multirun (no stages, so no training): four job directories, each with its own overrides."""
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=sweep_lr_unet", "stages=[]", "dataset=null",
           "logger=csv", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    overrides = {tuple(OmegaConf.load(tmp_path / "sweep" / j / ".hydra" / "overrides.yaml")[:2]) for j in jobs}
    assert len(overrides) == 4


def test_submitit_slurm_launcher_preset_composes(tmp_path: Path) -> None:
    cfg = _compose("hydra/launcher=submitit_slurm", "trainer=ddp", "hydra.launcher.nodes=2", "trainer.num_nodes=2",
                   f"out_dir={tmp_path}", hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8  # one task per GPU: Lightning does not spawn
    assert launcher.nodes == cfg.trainer.num_nodes == 2
    assert launcher.submitit_folder.startswith(cfg.hydra.sweep.dir)
    # sbatch's pre-timeout signal is the one train.py saves and requeues on
    assert launcher.additional_parameters.signal == f"{cfg.preemption.signal.removeprefix('SIG')}@120"


def _ddp_buffers_rank(rank: int, kwargs: dict) -> tuple[list[float], list[float]]:
    """A module whose buffer differs by rank, wrapped by DDP with ``kwargs``: the buffer after the wrap, and after a
    training forward before which rank 1 changed its own."""
    module = torch.nn.Linear(2, 2)
    module.register_buffer("shadow", torch.full((2,), float(rank)))
    ddp = torch.nn.parallel.DistributedDataParallel(module, **kwargs)
    at_wrap = module.shadow.tolist()
    if rank == 1:
        module.shadow.fill_(7.0)
    with torch.no_grad():  # DDP syncs buffers in its forward; a backward in a forked child would fail
        ddp.require_forward_param_sync = True  # as in training: the forward that precedes a backward
        ddp(torch.ones(1, 2))
    return at_wrap, module.shadow.tolist()


def _ddp_strategy(trainer: str, tmp_path: Path):
    return instantiate(_compose(f"trainer={trainer}", f"out_dir={tmp_path}").trainer.strategy)


@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu"])
def test_ddp_presets_do_not_broadcast_the_buffers_every_step(tmp_path: Path, trainer: str) -> None:
    """DDP copies every buffer from rank 0 before each forward unless told not to; the EMA's shadow weights are
    buffers (a float32 UNet), equal on every rank anyway."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = _ddp_strategy(trainer, tmp_path)
    assert type(strategy) is DDPStrategy and strategy._ddp_kwargs == {"forward_sync_buffers": False}


def test_the_ddp_preset_syncs_buffers_once_at_the_wrap(tmp_path: Path) -> None:
    """On two gloo ranks: rank 0's buffer reaches rank 1 when DDP wraps the model; rank 1's own change survives
    the forward after it (no broadcast before it)."""
    kwargs = _ddp_strategy("ddp_cpu", tmp_path)._ddp_kwargs
    seen = on_two_ranks(_ddp_buffers_rank, tmp_path / "store", kwargs)
    assert seen == {0: ([0.0, 0.0], [0.0, 0.0]), 1: ([0.0, 0.0], [7.0, 7.0])}
