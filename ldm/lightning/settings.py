"""Fail-fast checks of a run's config: every stage's settings, the sampling defaults and the paths a run reads are
checked before any work, so a typo costs seconds, not a trained stage. Each error names the key."""

from __future__ import annotations

import importlib.util
import math
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.autoencoder.autoencoder_kl import downsample_factor
from ldm.autoencoder.losses import patch_min_size
from ldm.data.cache_latents import PRECISIONS as CACHE_PRECISIONS
from ldm.data.masks import MaskSettings
from ldm.diffusion import DiffusionLoss, FlowMatchingLoss, NoiseSchedule, SamplingDefaults
from ldm.diffusion.sampling import check_sampler, default_sampler
from ldm.errors import ConfigError
from ldm.lightning.slurm import slurm_job_id

STAGES = ("vae", "ldm")  # the stages a run may name, in the order they run
EVALUATION_TARGET = "ldm.lightning.evaluation.Evaluation"  # the evaluation callback's _target_
INIT_CKPT_REQUIRED = "init_ckpt=PATH is required: the Stable Diffusion single file (.safetensors/.ckpt) to load"
NO_AUTOENCODER = ("the ldm stage needs an autoencoder: set vae_ckpt=PATH (vae/vae.ckpt of a vae-stage run), run both "
                  "stages (stages=[vae,ldm]), start from an SD single file (init_ckpt=PATH), or train in pixel space "
                  "(first_stage=pixel)")

LR_SCHEDULES = ("constant", "cosine", "linear", "wsd")
# The config keys a resumed run may change: they alter neither the model nor the order of the data.
RESUME_FREE = (
    "resume", "out_dir", "stages", "logger", "callbacks", "sampling", "perf", "preemption", "vae_stage.max_steps",
    "ldm_stage.max_steps", "trainer.log_every_n_steps", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.progress_bar_refresh_steps", "eval", "data.val_shards", "ldm_stage.val_every_n_steps",
    "ldm_stage.val_timesteps", "ldm_stage.val_seed",
)


def _int(key: str, value: Any, low: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def _float(key: str, value: Any, low: float | None = None, high: float | None = None, allow_none: bool = False,
           open_low: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if low is not None and (value <= low if open_low else value < low):
        raise ConfigError(f"{key} must be {'>' if open_low else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{key} must be <= {high}, got {value}")


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def check_unet(unet_cfg: DictConfig) -> None:
    """Build the configured UNet on the meta device (no memory, a fraction of a second), so a setting it refuses (a
    fractional channel multiplier, heads that do not fit a level, an unknown key) stops the run before the first
    stage rather than after the vae stage."""
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        with torch.device("meta"):
            instantiate(unet_cfg)
    except InstantiationException as err:
        raise ConfigError(f"unet: {err.__cause__ or err}") from None


def check_text_encoder_weights(text_cfg: DictConfig | None) -> None:
    """The text encoder's local weights: ``pretrained_path`` (transformers: a folder) and ``pretrained`` (open_clip: a
    file). The ldm stage builds the encoder only after the vae stage has trained, so a wrong path is named here."""
    if text_cfg is None:
        return

    def hf_folder(path: Path) -> bool:  # HFCLIPTextEncoder's: config.json in it, or in its text_encoder/
        return (path / "config.json").is_file() or (path / "text_encoder" / "config.json").is_file()

    for key, kind, exists in (("pretrained_path", "folder with config.json", hf_folder),
                              ("pretrained", "file", Path.is_file)):
        value = text_cfg.get(key)
        if value is not None and not exists(Path(str(value)).expanduser()):
            raise ConfigError(f"text_encoder.{key}={value}: no such {kind}. Point it at a local copy of the weights "
                              f"(ldm never downloads them: docs/text.md), or set text_encoder.{key}=null for random "
                              "weights (or weights from init_ckpt)")


def check_grid_labels(cfg: DictConfig) -> None:
    """``callbacks.ldm.samples.class_labels`` against ``unet.num_classes``: the grid callback checks them only when it
    samples, and a wrong label then skipped every grid of the run with a warning."""
    samples = OmegaConf.select(cfg, "callbacks.ldm.samples")
    labels = None if samples is None else samples.get("class_labels")
    if labels is None:
        return
    key, num_classes = "callbacks.ldm.samples.class_labels", cfg.unet.get("num_classes")
    if num_classes is None:
        raise ConfigError(f"{key}={labels} but the UNet has no classes (unet.num_classes=null): drop the labels, or "
                          "train a class-conditional UNet")
    values = [labels] if isinstance(labels, int) else list(labels)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_classes]
    if bad:
        raise ConfigError(f"{key}: {bad} are not classes of the UNet (integers in [0, {num_classes}), "
                          f"unet.num_classes={num_classes})")


def check_optimizer(opt: DictConfig | None) -> None:
    """The ldm stage's ``optimizer``: a positive learning rate, Adam's two betas in [0, 1) and a weight decay >= 0,
    where it has them (the optimizer's own check runs only when the stage builds it, after the vae stage)."""
    if opt is None:
        return
    if "lr" in opt:
        _float("optimizer.lr", opt.lr, 0.0, open_low=True)
    if "weight_decay" in opt:
        _float("optimizer.weight_decay", opt.weight_decay, 0.0)
    if "betas" in opt:
        betas = opt.betas
        if not OmegaConf.is_list(betas) or len(betas) != 2:
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {betas!r}")
        for i, beta in enumerate(betas):
            _float(f"optimizer.betas[{i}]", beta, 0.0)
            if beta >= 1:
                raise ConfigError(f"optimizer.betas[{i}] must be < 1, got {beta}")


def check_vae_stage(s: DictConfig) -> None:
    """``vae_stage.*``: types and ranges."""
    _int("vae_stage.max_steps", s.max_steps, 1)
    _int("vae_stage.batch_size", s.batch_size, 1)
    _int("vae_stage.num_workers", s.num_workers, 0)
    _float("vae_stage.lr", s.lr, 0.0, open_low=True)
    if not OmegaConf.is_list(s.betas) or len(s.betas) != 2:
        raise ConfigError(f"vae_stage.betas must be two numbers [beta1, beta2], got {s.betas!r}")
    for i, b in enumerate(s.betas):
        _float(f"vae_stage.betas[{i}]", b, 0.0, 1.0)
    _choice("vae_stage.lr_schedule", s.lr_schedule, ("constant", "cosine", "linear"))
    _choice("vae_stage.rec_loss", s.rec_loss, ("l1", "l2"))
    _float("vae_stage.kl_weight", s.kl_weight, 0.0)
    _float("vae_stage.perceptual_weight", s.perceptual_weight, 0.0)
    if s.perceptual_weight > 0:
        if not s.perceptual_weights:
            raise ConfigError("vae_stage.perceptual_weight > 0 needs vae_stage.perceptual_weights=PATH (local VGG16 "
                              "and LPIPS weights: a file, or a list such as [vgg16-397923af.pth,vgg.pth])")
        paths = list(s.perceptual_weights) if OmegaConf.is_list(s.perceptual_weights) else [s.perceptual_weights]
        for path in paths:
            if not Path(str(path)).is_file():
                raise ConfigError(f"vae_stage.perceptual_weights: {path}: no such file")
    _int("vae_stage.disc_start", s.disc_start, 0, allow_none=True)
    _float("vae_stage.disc_weight", s.disc_weight, 0.0)
    _int("vae_stage.disc_channels", s.disc_channels, 1)
    _int("vae_stage.disc_layers", s.disc_layers, 1)
    _int("vae_stage.latent_scale_batches", s.latent_scale_batches, 1)
    _choice("vae_stage.latent_normalization", s.latent_normalization, ("scalar", "per_channel"))
    _float("vae_stage.scale_equivariance", s.scale_equivariance, 0.0)
    _float("vae_stage.gradient_clip_val", s.get("gradient_clip_val"), 0.0, open_low=True, allow_none=True)


def check_ldm_stage(s: DictConfig) -> None:
    """``ldm_stage.*``: types and ranges."""
    _int("ldm_stage.max_steps", s.max_steps, 1)
    _int("ldm_stage.batch_size", s.batch_size, 1)
    _int("ldm_stage.num_workers", s.num_workers, 0)
    _float("ldm_stage.caption_dropout", s.caption_dropout, 0.0, 1.0)
    _float("ldm_stage.ema_decay", s.ema_decay, 0.0, allow_none=True)
    if s.ema_decay is not None and s.ema_decay >= 1:
        raise ConfigError(f"ldm_stage.ema_decay must lie in [0, 1), got {s.ema_decay}")
    _bool("ldm_stage.ema_warmup", s.ema_warmup)
    _choice("ldm_stage.lr_schedule", s.lr_schedule, LR_SCHEDULES)
    _float("ldm_stage.lr_decay_fraction", s.lr_decay_fraction, 0.0, 1.0, open_low=True)
    _int("ldm_stage.warmup_steps", s.warmup_steps, 0)
    _choice("ldm_stage.nan_policy", s.nan_policy, ("stop", "skip"))
    _int("ldm_stage.max_nan_skips", s.max_nan_skips, 0)
    for key in ("gradient_checkpointing", "compile", "cache_latents"):
        _bool(f"ldm_stage.{key}", s[key])
    _int("ldm_stage.cache_batch_size", s.cache_batch_size, 1)
    _bool("ldm_stage.cache_compile", s.get("cache_compile", False))
    if s.get("cache_precision") is not None:
        _choice("ldm_stage.cache_precision", s.cache_precision, tuple(CACHE_PRECISIONS))
    step = s.guide_snapshot_step
    if step is not None:
        _float("ldm_stage.guide_snapshot_step", step, 0.0, open_low=True)
    _int("ldm_stage.val_every_n_steps", s.get("val_every_n_steps", 0), 0)
    _int("ldm_stage.val_timesteps", s.get("val_timesteps", 8), 1)
    _int("ldm_stage.val_seed", s.get("val_seed", 0), 0)
    lora = s.get("lora")
    if lora is not None:  # ldm/lora.py checks the targets against the model
        _int("ldm_stage.lora.rank", lora.get("rank"), 1, allow_none=True)
        _float("ldm_stage.lora.alpha", lora.get("alpha"), 0.0, open_low=True, allow_none=True)
        _float("ldm_stage.lora.dropout", lora.get("dropout", 0.0), 0.0, 1.0)
        if lora.get("dropout", 0.0) == 1.0:
            raise ConfigError("ldm_stage.lora.dropout must be < 1, got 1.0")
        _bool("ldm_stage.lora.text_encoder", lora.get("text_encoder", False))
    inpainting = s.get("inpainting")
    if inpainting is not None:  # the masks an inpainting UNet trains on: checked by MaskSettings
        if not isinstance(inpainting, DictConfig):
            raise ConfigError(f"ldm_stage.inpainting must be a mapping of mask settings, got {inpainting!r}")
        try:
            MaskSettings(**OmegaConf.to_container(inpainting, resolve=True))
        except TypeError as err:
            raise ConfigError(f"ldm_stage.inpainting: {err}") from None


def is_lora_run(cfg: DictConfig) -> bool:
    """Whether ``ldm_stage.lora`` asks for adapters (a rank): a LoRA run, not a full fine-tune."""
    lora = cfg.ldm_stage.get("lora")
    return lora is not None and lora.get("rank") is not None


def check_lora_run(cfg: DictConfig, init_ckpt: str | None) -> None:
    """A LoRA run (``ldm_stage.lora.rank`` set) trains adapters on one base file, ``init_ckpt``, which its
    checkpoints record: the VAE comes from it too (no vae stage or ``vae_ckpt``), and it keeps no autoguidance
    snapshot. Checked before any stage, so the vae stage of ``stages=[vae,ldm]`` does not train first."""
    if not is_lora_run(cfg):
        return
    if not init_ckpt:
        raise ConfigError("ldm_stage.lora.rank trains adapters on a base model: set init_ckpt=PATH, an SD single file "
                          "or an ldm checkpoint (RUN/ldm/checkpoints/last.ckpt)")
    if cfg.get("vae_ckpt") or "vae" in cfg.stages:
        raise ConfigError("ldm_stage.lora takes the VAE from init_ckpt (the checkpoint records that one base file): "
                          "drop vae_ckpt and run stages=[ldm]")
    if cfg.ldm_stage.get("guide_snapshot_step") is not None:
        raise ConfigError("ldm_stage.lora does not keep an autoguidance snapshot: set ldm_stage.guide_snapshot_step="
                          "null")


def check_cache_run(cfg: DictConfig) -> None:
    """``ldm_stage.cache_latents`` encodes image shards in one process, once per image (no augmentation)."""
    if cfg.data.get("source", "images") != "images":
        raise ConfigError("ldm_stage.cache_latents=true encodes image shards, but data.source is "
                         f"{cfg.data.get('source')!r}: the data is a latent cache already; set "
                         "ldm_stage.cache_latents=false")
    if cfg.data.get("buckets"):
        raise ConfigError("ldm_stage.cache_latents=true with data.buckets: the latent cache holds one size, the "
                          "buckets several. Set ldm_stage.cache_latents=false to train on buckets (each image is "
                          "encoded at its bucket's size while training)")
    crop, hflip = cfg.data.get("crop", "center"), bool(cfg.data.get("hflip", False))
    if crop != "center" or hflip:
        raise ConfigError(
            f"ldm_stage.cache_latents=true encodes each image once, centre-cropped and unflipped, so data.crop={crop} "
            f"data.hflip={str(hflip).lower()} would augment nothing. Set data.crop=center data.hflip=false, or "
            "ldm_stage.cache_latents=false to encode each augmented image while training")
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if str(devices) != "1" or str(nodes) != "1":
        raise ConfigError(
            f"ldm_stage.cache_latents=true runs in one process (trainer.devices={devices}, num_nodes={nodes}; the "
            "quickstart preset turns it on). Set ldm_stage.cache_latents=false to encode images on the fly, or cache "
            "once beforehand (python -m ldm.data.cache_latents SHARDS CACHE --vae RUN/vae/vae.ckpt --size S) and "
            "train with data.source=latents data.train_shards=CACHE")


def run_sampling(cfg: DictConfig) -> SamplingDefaults:
    """The sampling defaults a run's checkpoints record: ``sampling.*``, with the model kind's sampler when none is
    named (flow_euler for ``diffusion.objective=flow_matching``); a sampler of the other kind is a ConfigError."""
    values = OmegaConf.to_container(cfg.sampling, resolve=True)
    d = cfg.diffusion
    if d.get("objective", "diffusion") == "flow_matching":
        schedule = {"objective": "flow_matching"}
    else:
        schedule = OmegaConf.to_container(d.schedule, resolve=True)
    if values.get("sampler") is None:
        values["sampler"] = default_sampler(schedule, d.prediction_type)
    check_sampler(values["sampler"], schedule, d.prediction_type)
    return SamplingDefaults.from_dict(values)


def diffusion_objective(d: DictConfig) -> DiffusionLoss | FlowMatchingLoss:
    """The training objective of the ``diffusion`` group: a noise schedule, prediction target and loss weighting, or
    ``objective: flow_matching`` with its ``flow`` settings. A wrong setting is a ConfigError naming it."""
    objective = d.get("objective", "diffusion")
    if objective not in ("diffusion", "flow_matching"):
        raise ConfigError(f"diffusion.objective={objective!r}: use diffusion (a noise schedule) or flow_matching")
    try:
        if objective == "flow_matching":
            return FlowMatchingLoss(**OmegaConf.to_container(d.flow, resolve=True))
        schedule = NoiseSchedule.from_name(**OmegaConf.to_container(d.schedule, resolve=True))
        return DiffusionLoss(schedule, d.prediction_type, d.loss_weighting, d.snr_gamma, d.offset_noise,
                             d.get("timestep_shift", 1.0))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"diffusion: {err}") from None


def check_run(cfg: DictConfig) -> None:
    """Everything a run will read, checked before its first stage: the stages it runs, their settings, the sampling
    defaults and the input files."""
    if isinstance(cfg.stages, str):  # stages=ldm: "ldm" in a string would also match the letters
        raise ConfigError(f"stages must be a list, got the string {cfg.stages!r}: write stages=[{cfg.stages}] (or "
                          "stages=[vae,ldm])")
    stages = list(cfg.stages)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown stages {sorted(unknown)}; use stages=[vae], [ldm] or [vae,ldm]")
    if "vae" in stages:
        check_vae_stage(cfg.vae_stage)
        check_discriminator_fits(cfg)
        check_scale_equivariance_fits(cfg)
        check_autoencoder_fits(cfg)
    if "ldm" in stages:
        check_ldm_stage(cfg.ldm_stage)
        diffusion_objective(cfg.diffusion)
        _choice("first_stage", cfg.get("first_stage", "vae"), ("vae", "pixel"))
        check_optimizer(cfg.get("optimizer"))
        check_unet(cfg.unet)
        check_text_encoder_weights(cfg.get("text_encoder"))
        check_grid_labels(cfg)
        if cfg.ldm_stage.cache_latents:
            check_cache_run(cfg)
        try:
            run_sampling(cfg)
        except ValueError as err:
            raise ConfigError(f"sampling: {err}") from None
        if cfg.get("vae_ckpt") and not Path(cfg.vae_ckpt).is_file():
            raise ConfigError(f"vae_ckpt={cfg.vae_ckpt}: no such file (the vae/vae.ckpt of a vae-stage run)")
        resuming = resume_mode(cfg) is not None  # a resumed checkpoint holds the weights and the first stage
        if OmegaConf.is_missing(cfg, "init_ckpt") and not resuming:  # a preset that starts from a file names none
            raise ConfigError(INIT_CKPT_REQUIRED)
        init_ckpt = None if OmegaConf.is_missing(cfg, "init_ckpt") else cfg.get("init_ckpt")
        check_lora_run(cfg, init_ckpt)
        # a resumed full fine-tune holds every weight (its base file is not read); a LoRA run's base loads again
        if init_ckpt and not Path(init_ckpt).is_file() and (is_lora_run(cfg) or not resuming):
            raise ConfigError(f"init_ckpt={init_ckpt}: no such file (an SD .ckpt/.safetensors, or an ldm "
                              "checkpoint RUN/ldm/checkpoints/last.ckpt)")
        # No source of a first stage at all (cached latents get their own message, which says which VAE:
        # stages.check_latent_source)
        if ("vae" not in stages and cfg.get("first_stage", "vae") == "vae" and not cfg.get("vae_ckpt")
                and not init_ckpt and not resuming and (cfg.get("data") or {}).get("source", "images") != "latents"):
            raise ConfigError(NO_AUTOENCODER)
    _int("seed", cfg.seed, 0)
    check_strategy(cfg.get("trainer"))
    if cfg.get("trainer") is not None and "progress_bar_refresh_steps" in cfg.trainer:
        _int("trainer.progress_bar_refresh_steps", cfg.trainer.progress_bar_refresh_steps, 1)
    check_preemption(cfg.get("preemption"))
    check_logger(cfg.get("logger"))
    if "ldm" in stages:  # last: an enabled evaluation is checked by building its callback, which imports Lightning
        check_evaluations(cfg)


SHARDED_CHECKPOINTS = (
    "trainer.strategy.state_dict_type={value!r}: a sharded checkpoint is a folder of per-rank files, which "
    "resume=auto|last, sample.py and ldm.convert do not read (a requeued job would start again from step 0). Keep "
    "state_dict_type=full (the default): rank 0 writes one file, gathered from the shards")


def check_strategy(trainer: DictConfig | None) -> None:
    """A strategy given as an object (``trainer.strategy._target_``, FSDP's): its checkpoints must be whole files."""
    strategy = None if trainer is None else trainer.get("strategy")
    if isinstance(strategy, DictConfig) and strategy.get("state_dict_type", "full") != "full":
        raise ConfigError(SHARDED_CHECKPOINTS.format(value=strategy.state_dict_type))


def check_discriminator_fits(cfg: DictConfig) -> None:
    """The PatchGAN's input is at least 3 x 2^disc_layers pixels (each layer halves it), checked before training
    rather than at ``disc_start``, which may come many hours in. Buckets' sizes are checked at the step."""
    s, data = cfg.vae_stage, cfg.get("data") or {}
    if s.disc_start is None or data.get("buckets") or data.get("image_size") is None:
        return
    least = patch_min_size(s.disc_layers)
    if data.image_size < least:
        raise ConfigError(f"vae_stage.disc_layers={s.disc_layers} needs images of at least {least} px, and "
                          f"data.image_size={data.image_size}: lower vae_stage.disc_layers or raise data.image_size")


def check_scale_equivariance_fits(cfg: DictConfig) -> None:
    """``vae_stage.scale_equivariance`` pools the latents 2x: the latent size (image size / the VAE's downsampling)
    must be even. Buckets' sizes are checked at the step."""
    data = cfg.get("data") or {}
    if not cfg.vae_stage.scale_equivariance or data.get("buckets") or data.get("image_size") is None:
        return
    factor = downsample_factor(cfg.autoencoder.ch_mult)
    if (data.image_size // factor) % 2:
        raise ConfigError(f"vae_stage.scale_equivariance pools the latents 2x and needs an even latent size; "
                          f"data.image_size={data.image_size} gives {data.image_size // factor} latent pixels: use a "
                          f"multiple of {2 * factor} px or set vae_stage.scale_equivariance=0")


def check_autoencoder_fits(cfg: DictConfig) -> None:
    """The vae stage's images fit its autoencoder: a side that its downsampling divides (buckets are checked at the
    step), and as many channels as the autoencoder reads and writes (``data.image_mode``: RGB 3, L 1)."""
    data, ae = cfg.get("data") or {}, cfg.get("autoencoder") or {}
    size = data.get("image_size")
    if "ch_mult" in ae and size is not None and not data.get("buckets"):
        factor = downsample_factor(ae.ch_mult)
        if size % factor:
            raise ConfigError(f"data.image_size={size} is not a multiple of the autoencoder's downsampling factor "
                              f"{factor} (autoencoder.ch_mult={list(ae.ch_mult)}): use a multiple of {factor} px")
    mode = data.get("image_mode")
    channels = {"RGB": 3, "L": 1}.get(str(mode))
    if channels is None:
        return
    for key in ("in_channels", "out_channels"):
        if ae.get(key, 3) != channels:
            raise ConfigError(f"data.image_mode={mode} gives {channels}-channel images, but autoencoder.{key}="
                              f"{ae.get(key, 3)}: set autoencoder.in_channels={channels} "
                              f"autoencoder.out_channels={channels}, or data.image_mode="
                              f"{'L' if ae.get(key, 3) == 1 else 'RGB'}")


def resume_mode(cfg: DictConfig) -> str | None:
    """``cfg.resume``; unset under a SLURM batch job it is ``auto``, so a requeued job resumes with no flag."""
    if cfg.get("resume"):
        return str(cfg.resume)
    return "auto" if slurm_job_id() is not None else None


def check_evaluations(cfg: DictConfig) -> None:
    """Each enabled evaluation callback of the ldm stage (``ldm.lightning.evaluation.Evaluation``): its reference
    statistics, extractor weights and captions, before any training (a missing file would otherwise surface at the
    first evaluation, hours in)."""
    group = (cfg.get("callbacks") or {}).get("ldm") or {}
    for name, entry in group.items():
        if entry is not None and entry.get("_target_") == EVALUATION_TARGET and entry.get("ref_stats"):
            from ldm.lightning.evaluation import check_evaluation  # imports Lightning: only for an enabled one

            kwargs = OmegaConf.to_container(entry, resolve=True)
            kwargs.pop("_target_")
            check_evaluation(f"callbacks.ldm.{name}", kwargs, cfg.get("text_encoder") is not None)


def check_logger(logger: DictConfig | None) -> None:
    """A logger whose package is not installed is named with its install command before any stage runs (Lightning
    would fail only when the stage builds it, after the vae stage for the ldm stage's)."""
    target = str((logger or {}).get("_target_", ""))
    needs = {"TensorBoardLogger": (("tensorboard", "tensorboardX"), "pip install -e '.[tensorboard]'"),
             "WandbLogger": (("wandb",), "pip install wandb")}
    for name, (modules, command) in needs.items():
        if target.endswith(name) and not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(f"logger {target} needs {' or '.join(modules)}, which is not installed: {command}, or "
                              "logger=csv")


def check_preemption(p: DictConfig | None) -> None:
    """``preemption.*``: a signal name, a positive check period, a boolean requeue."""
    if p is None:
        return
    parse_signal(p.signal)
    _int("preemption.check_every_n_steps", p.check_every_n_steps, 1)
    _bool("preemption.requeue", p.requeue)


def parse_signal(name: str | int) -> signal.Signals:
    """``SIGUSR1``, ``USR1`` or a number as a signal; a ConfigError naming the valid spellings otherwise."""
    try:
        if isinstance(name, int) and not isinstance(name, bool):
            return signal.Signals(name)
        text = str(name).upper()
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise ConfigError(f"preemption.signal={name!r} is not a signal; use a name such as SIGUSR1 or SIGUSR2 (as in "
                          "sbatch --signal=USR1@90)") from None
