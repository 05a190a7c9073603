"""Assembles a training run from its Hydra config: the autoencoder stage, then the latent diffusion stage.

``run(cfg)`` is what ``train.py`` calls. Hydra instantiation happens here and only here; the modules below take
plain objects.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.checkpoint import (
    atomic_write_text,
    check_lora_base,
    checkpoint_kind,
    file_sha256,
    load_autoencoder,
    load_first_stage,
    load_init_checkpoint,
    read_checkpoint,
    save_autoencoder,
)
from ldm.compiling import compile_in_place
from ldm.convert import SDCheckpoint, init_from_sd, load_sd_vae, sd_latent_normalization
from ldm.data.cache_latents import SETTINGS_NAME, cache_for_vae, weights_fingerprint
from ldm.data.masks import MaskSettings
from ldm.diffusion import DiffusionLoss
from ldm.diffusion.flow import FlowMatchingLoss
from ldm.diffusion.validation import DEFAULT_NUM_TIMESTEPS
from ldm.errors import ConfigError
from ldm.lightning.autoencoder_module import AutoencoderModule
from ldm.lightning.callbacks import ResumedValidation, Throughput
from ldm.lightning.checkpoint_io import AtomicCheckpointIO
from ldm.lightning.console import StepProgressBar, headline, parts_summary
from ldm.lightning.diffusion_module import LatentDiffusionModule, NaNPolicy, ValidationSettings, recorded_objective
from ldm.lightning.optim import LRSchedule
from ldm.lightning.precision import AUTO, autocast_precision, resolve_precision
from ldm.lightning.preemption import PreemptionCheckpoint, record_signals, stop_between_stages
from ldm.lightning.run_lock import RunLock
from ldm.lightning.run_log import log_to_run_file
from ldm.lightning.settings import (
    INIT_CKPT_REQUIRED,
    NO_AUTOENCODER,
    RESUME_FREE,
    STAGES,
    check_lora_run,
    check_run,
    diffusion_objective,
    is_lora_run,
    resume_mode,
    run_sampling,
)
from ldm.lora import add_lora, save_lora
from ldm.nn.ema import EMASettings

LATENT_HOW = (
    "Train the VAE on image shards (stages=[vae], data.source=images), cache its latents (python -m "
    "ldm.data.cache_latents SHARDS CACHE --vae RUN/vae/vae.ckpt --size S), then train with data.source=latents "
    "data.train_shards=CACHE stages=[ldm] vae_ckpt=RUN/vae/vae.ckpt (or data=shapes_latents)."
)


# ---------------------------------------------------------------------------------------------------- plumbing


def save_config(cfg: DictConfig, stage_dir: Path) -> None:
    """The resolved config beside the stage's checkpoints, and the command line that started the stage (rank 0 only:
    under DDP the others reuse the path). A resumed run reads both (``resume_config``)."""
    if rank_zero_only.rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stage_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        overrides, record = command_line_overrides(), stage_dir / "overrides.yaml"
        if overrides is not None and not record.exists():  # the command line that started the stage
            atomic_write_text(record, OmegaConf.to_yaml(OmegaConf.create(overrides)))


def make_callbacks(group: DictConfig | None) -> list[L.Callback]:
    """The callbacks of one stage (``callbacks.vae`` / ``callbacks.ldm``); a null entry switches one off.
    ``Throughput`` goes first, whatever the config's order: Lightning calls the callbacks' batch-end hooks in list
    order, and a sample grid or an evaluation drawn before Throughput stopped its clock would count as step time."""
    callbacks = [instantiate(c) for c in (group or {}).values() if c is not None]
    return sorted(callbacks, key=lambda c: not isinstance(c, Throughput))  # stable: the others keep their order


def with_validation(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose ``trainer`` validates on the ldm stage's schedule: with ``data.val_shards``, every
    ``ldm_stage.val_every_n_steps`` optimizer steps, counted over epochs (the module adds one at the last step);
    without them, never (so Lightning neither runs nor warns about an empty validation loop). Validation keys given
    in ``cfg.trainer`` win."""
    every = cfg.ldm_stage.get("val_every_n_steps", 0)
    if cfg.data.get("val_shards") is None or not every:
        schedule: dict[str, Any] = {"limit_val_batches": 0}
    else:
        accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)  # the interval counts batches
        schedule = {"val_check_interval": every * accumulate, "check_val_every_n_epoch": None}
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in schedule.items():
            if key not in out.trainer:
                out.trainer[key] = value
    return out


def make_trainer(cfg: DictConfig, stage_dir: Path, max_steps: int, callbacks: list, logger,
                 manual: bool = False) -> L.Trainer:
    """A Lightning trainer from ``cfg.trainer`` whose checkpoints are written atomically."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(kwargs.get("strategy"), dict):  # a strategy object (``_target_``), e.g. trainer=fsdp_cpu's
        kwargs["strategy"] = instantiate(kwargs["strategy"])
    if manual:  # manual optimisation (the VAE's two optimizers) clips itself (vae_stage.gradient_clip_val)
        kwargs.pop("gradient_clip_val", None)
        # and Lightning cannot accumulate for it: the shared key is the ldm stage's
        if int(kwargs.pop("accumulate_grad_batches", 1) or 1) > 1:
            rank_zero_info(f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches} applies to the ldm "
                           "stage: the vae stage steps its optimizers every batch (raise vae_stage.batch_size instead)")
    kwargs.setdefault("enable_model_summary", False)  # the stage's headline names the parts and their sizes
    if str(kwargs.get("precision")) == AUTO:
        kwargs["precision"] = resolve_precision(AUTO, kwargs.get("accelerator", "auto"))
        rank_zero_info(f"trainer.precision auto: {kwargs['precision']} (bf16-mixed on a CPU with native bf16, "
                       "else 32-true)")
    refresh = kwargs.pop("progress_bar_refresh_steps", 1)  # ldm's key, not Lightning's
    if kwargs.setdefault("enable_progress_bar", True):
        callbacks = [*callbacks, StepProgressBar(refresh_rate=refresh)]
    plugins: list = [AtomicCheckpointIO()]
    callbacks = [*callbacks, ResumedValidation()]
    if cfg.get("preemption") is not None:
        p = cfg.preemption
        callbacks = [*callbacks, PreemptionCheckpoint(p.signal, p.check_every_n_steps)]
        if SLURMEnvironment.detect():  # the requeue is PreemptionCheckpoint's: Lightning's would save mid-step
            plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(**kwargs, max_steps=max_steps, default_root_dir=str(stage_dir), callbacks=callbacks,
                     logger=logger, plugins=plugins)


def finish_fit(cfg: DictConfig, trainer: L.Trainer) -> None:
    """After ``fit``: end the loggers' runs; if a signal stopped the stage, requeue (SLURM) and raise ``Preempted``."""
    close_loggers(trainer)
    for callback in trainer.callbacks:
        if isinstance(callback, PreemptionCheckpoint):
            callback.stop(trainer, requeue=bool(cfg.preemption.requeue))


def make_logger(cfg: DictConfig, name: str, stage_dir: Path, resume_step: int | None = None):
    """The configured experiment logger for one stage (False without one), with the run's config logged.

    A resumed stage continues its logger run: the version (CSV, TensorBoard) or run id (wandb) the stage started
    with is kept in ``stage_dir/logger.json``; ldm's CSVLogger drops the rows the checkpoint had not reached.
    """
    if cfg.get("logger") is None:
        return False
    kwargs: dict[str, Any] = {"name": name} if "name" not in cfg.logger else {}
    record = stage_dir / "logger.json"
    target = cfg.logger.get("_target_", "")
    if resume_step is not None and record.is_file():
        previous = json.loads(record.read_text())
        if previous.get("target") == target:
            if target.endswith("WandbLogger"):
                kwargs.update(id=previous["version"], resume="allow")
            else:
                kwargs["version"] = previous["version"]
            if target == "ldm.lightning.loggers.CSVLogger":
                kwargs["resume_step"] = resume_step
    logger = instantiate(cfg.logger, **kwargs)
    init = getattr(logger, "_wandb_init", None)  # WandbLogger's arguments for wandb.init (a Lightning private)
    if isinstance(init, dict) and init.get("anonymous") is None:
        # Lightning passes anonymous=None always, and wandb warns that the setting has no effect at every run's start
        init.pop("anonymous", None)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the run's config beside its curves
    if rank_zero_only.rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps({"target": target, "version": logger.version}))
    return logger


def close_loggers(trainer: L.Trainer) -> None:
    """End each logger's run, so the next stage starts its own (WandbLogger would otherwise reuse the active run)."""
    for logger in trainer.loggers:
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()


def make_data(cfg: DictConfig, stage: DictConfig, **overrides: Any) -> L.LightningDataModule:
    """The stage's DataModule: its batch size and workers, and the built-in dataset it shards when missing."""
    builtin = OmegaConf.to_container(cfg.dataset, resolve=True) if cfg.get("dataset") else None
    try:
        return instantiate(cfg.data, batch_size=stage.batch_size, num_workers=stage.num_workers, builtin=builtin,
                           **overrides)
    except InstantiationException as err:  # a refused data setting: its own message, one line and exit 2 in train.py
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def _last_metrics(trainer: L.Trainer, *names: str) -> str:
    """The last logged value of each metric, for the stage's closing line."""
    values = {n: trainer.callback_metrics.get(n) for n in names}
    return ", ".join(f"{n.split('/')[-1]} {float(v):.4g} (last batch)" for n, v in values.items() if v is not None)


# ---------------------------------------------------------------------------------------------------- checks


def _readable(path: Path) -> dict | None:
    try:  # memory-mapped: every rank looks at the step only (an sd15 training checkpoint holds about 15 GB)
        return read_checkpoint(path, mmap=True)
    except Exception as err:  # truncated or corrupt: any error torch's reader raises
        warnings.warn(f"{path} does not load ({type(err).__name__}: {str(err).splitlines()[0][:200]}); trying the "
                      "previous checkpoint", stacklevel=3)
        return None


def _step_of_name(path: Path) -> tuple[int, str]:
    """The step in a periodic checkpoint's name (``stepNNNNNN.ckpt``, ``stepNNNNNN-v1.ckpt``), for ordering them: by
    number, since a name sorts before a smaller step's once the step outgrows the six digits."""
    digits = re.match(r"step=?(\d+)", path.name)
    return (int(digits.group(1)) if digits else -1), path.name


def _run_folder_of(path: Path) -> Path | None:
    """RUN for a checkpoint at RUN/<stage>/checkpoints/NAME.ckpt, else None."""
    if path.parent.name == "checkpoints" and path.parents[1].name in STAGES:
        return path.parents[2]
    return None


def find_resume(cfg: DictConfig) -> tuple[str, str, int, Path | None] | None:
    """(stage, checkpoint path, its step, the run folder to continue in, or None for this run's) to resume from.

    ``resume=last``: the newest loadable checkpoint of this run's folder (``hydra.run.dir``), the ldm stage's before
    the vae stage's. ``resume=auto``: the same, or a fresh start when the folder holds none (the default under
    SLURM). ``resume=DIR``: the same in that run folder. ``resume=PATH``: that checkpoint. A run continues in the
    folder its checkpoint belongs to. A checkpoint that does not load is named in a warning and the previous one
    (``stepNNNNNN.ckpt``) is used.
    """
    mode = resume_mode(cfg)
    if not mode:
        return None
    here = mode in ("last", "auto")
    where = Path(cfg.out_dir) if here else Path(mode)
    if here or where.is_dir():
        for stage in ("ldm", "vae"):
            folder = where / stage / "checkpoints"
            candidates = [folder / "last.ckpt", *sorted(folder.glob("step*.ckpt"), key=_step_of_name, reverse=True)]
            for path in (p for p in candidates if p.is_file()):
                ckpt = _readable(path)
                if ckpt is not None:
                    return stage, str(path), int(ckpt.get("global_step", 0)), (None if here else where)
        if mode == "auto":
            rank_zero_info(f"resume=auto: no checkpoint in {where}; starting")
            return None
        raise ConfigError(
            f"resume={mode}: no loadable checkpoint in {where} (ldm/ or vae/checkpoints/*.ckpt). resume=last "
            "continues this run's folder: run with hydra.run.dir=RUN resume=last; or pass resume=RUN (a run folder) "
            "or resume=PATH (a checkpoint)")
    if not where.is_file():
        raise ConfigError(f"resume={mode}: no such checkpoint or run folder")
    ckpt = read_checkpoint(where, mmap=True)
    kind = checkpoint_kind(ckpt)
    if kind not in ("latent_diffusion",) and "loops" not in ckpt:
        raise ConfigError(f"resume={where} is not a training checkpoint of a stage (RUN/ldm|vae/checkpoints/*.ckpt)")
    return ("ldm" if kind == "latent_diffusion" else "vae"), str(where), int(ckpt.get("global_step", 0)), \
        _run_folder_of(where)


def command_line_overrides() -> list[str] | None:
    """This run's command-line overrides (``key=value``, no ``hydra.*``), or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(("resume=", "hydra."))]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").replace("/", ".")


def _free(key: str) -> bool:
    return any(key == free or key.startswith(free + ".") for free in RESUME_FREE)


def resume_config(cfg: DictConfig, stage_dir: Path, overrides: list[str] | None) -> DictConfig:
    """The config a resumed stage runs with: the run's saved ``stage_dir/config.yaml``, plus those command-line
    overrides that change neither the model nor the data order (``settings.RESUME_FREE``); other overrides that
    differ from the run's are refused, naming each."""
    saved_file = stage_dir / "config.yaml"
    if not saved_file.is_file():
        warnings.warn(f"{saved_file} is missing: the resumed run uses the command line's config", stacklevel=2)
        return cfg
    saved = OmegaConf.load(saved_file)
    original_file = stage_dir / "overrides.yaml"
    original = list(OmegaConf.load(original_file)) if original_file.is_file() else []
    given = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    merged = saved.copy()
    _fill_missing(merged, given)  # keys this release added keep their defaults
    refused = []
    for override in overrides or []:
        if override in original:
            continue
        key = _override_key(override)
        new, old = OmegaConf.select(given, key), OmegaConf.select(saved, key)
        if _free(key):
            OmegaConf.update(merged, key, new, force_add=True, merge=False)
        elif new != old:
            refused.append(f"{key} (the run has {_short(old)}, the command line {_short(new)})")
        elif OmegaConf.select(given, key, default="absent") == "absent":  # e.g. experiment=: a global preset
            refused.append(f"{override} (a preset that sets many keys: resume without it, the run's config holds it)")
    if refused:
        raise ConfigError(
            f"resuming {stage_dir.parent}: these overrides would change the model or the data order of a run in "
            f"progress: {'; '.join(refused)}. Drop them to continue the run as it was, or start a new run "
            "(another hydra.run.dir, with init weights or vae_ckpt) to change them")
    run_dir = str(stage_dir.parent)
    if merged.get("out_dir") and merged.out_dir != run_dir:  # a moved or copied run folder: its own paths
        merged = _reroot(merged, str(merged.out_dir), run_dir)
    merged.out_dir, merged.resume = run_dir, cfg.resume
    return merged


def _reroot(cfg: DictConfig, old: str, new: str) -> DictConfig:
    """``cfg`` with every string path under ``old`` moved under ``new``."""
    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
            return new + value[len(old.rstrip("/")):]
        return value

    return OmegaConf.create(move(OmegaConf.to_container(cfg)))


def _fill_missing(into: DictConfig, source: DictConfig) -> None:
    """Add the keys of ``source`` that ``into`` lacks, recursively; a node built from another ``_target_`` is left
    as it is. A key missing from a ``_target_`` node takes that constructor's default when it has one: the saved run
    was built without the key, so with that default, whatever today's preset sets."""
    target = into.get("_target_")
    for key in source:
        if key not in into:
            default = _constructor_default(target, key) if target else _NO_DEFAULT
            into[key] = source[key] if default is _NO_DEFAULT else default
        elif OmegaConf.is_dict(into[key]) and OmegaConf.is_dict(source[key]) and \
                into[key].get("_target_") == source[key].get("_target_"):
            _fill_missing(into[key], source[key])


_NO_DEFAULT = object()


def _constructor_default(target: str, key: str) -> Any:
    """The default of parameter ``key`` of the callable ``target`` names, or ``_NO_DEFAULT``."""
    try:
        param = inspect.signature(get_object(target)).parameters.get(key)
    except (ImportError, AttributeError, ValueError, TypeError):
        return _NO_DEFAULT
    return _NO_DEFAULT if param is None or param.default is inspect.Parameter.empty else param.default


def _short(value: Any) -> str:
    text = repr(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_latent_source(cfg: DictConfig, resume: tuple[str, str] | None) -> None:
    """``data.source=latents`` (a cache of ``python -m ldm.data.cache_latents``) feeds the ldm stage only, on the
    VAE whose latents were cached (``vae_ckpt``: its latent scale, and the decoder for samples)."""
    if cfg.data.get("source", "images") != "latents":
        return
    if "vae" in cfg.stages and (resume is None or resume[0] == "vae"):
        raise ConfigError(f"data.source=latents reads cached latents, but the vae stage trains on images. {LATENT_HOW}")
    if cfg.first_stage != "vae":
        raise ConfigError(f"data.source=latents needs first_stage=vae (cached latents are VAE latents). {LATENT_HOW}")
    if resume is None and not cfg.vae_ckpt:
        raise ConfigError(
            "data.source=latents needs vae_ckpt=PATH: the vae.ckpt whose latents were cached. The ldm stage applies "
            f"its latent scale to the cached latents and decodes samples with it. {LATENT_HOW}")
    shards = cfg.data.train_shards
    if isinstance(shards, str) and "{" not in shards and not Path(shards).exists():
        raise ConfigError(f"data.train_shards={shards}: no latent cache there. {LATENT_HOW}")


def check_cache_shape(cfg: DictConfig, latent_shape: list[int]) -> None:
    """Refuse a latent cache whose latents do not have the shape the UNet and the sampler will use."""
    import json

    shards = cfg.data.get("train_shards")
    if cfg.data.get("source", "images") != "latents" or not isinstance(shards, str):
        return
    index = Path(shards) / "index.json"
    cached = json.loads(index.read_text()).get("latents", {}).get("shape") if index.is_file() else None
    if cached is not None and list(cached) != list(latent_shape):
        raise ConfigError(
            f"the latent cache {shards} holds latents of shape {cached}, but this run trains on {latent_shape} "
            "(unet.in_channels, data.image_size / the VAE's downsampling): set data.image_size to the cached size, "
            "or cache again with the matching VAE and --size")


def check_cache_text(cfg: DictConfig, text_encoder: torch.nn.Module | None) -> None:
    """Refuse a latent cache whose text embeddings the run would train on (a frozen text encoder takes them instead
    of encoding the captions) but another text encoder made, or of another caption field than ``data.caption_field``:
    the cache records both (``cache_settings.json``)."""
    import json

    shards = cfg.data.get("train_shards")
    if (cfg.data.get("source", "images") != "latents" or not isinstance(shards, str) or text_encoder is None
            or not getattr(text_encoder, "frozen", False)):
        return
    path = Path(shards) / SETTINGS_NAME
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    if not recorded.get("text"):
        return
    field = cfg.data.get("caption_field")
    if recorded.get("caption_field") != field:
        raise ConfigError(f"the latent cache {shards} holds text embeddings of the caption field "
                          f"{recorded.get('caption_field')!r} (None: the .txt), but data.caption_field={field!r}: set "
                          "it to the cache's, or cache again with --caption-field")
    fingerprint = recorded.get("text_encoder")
    ours = weights_fingerprint(text_encoder) if fingerprint is not None else None
    if fingerprint != ours:
        raise ConfigError(f"the latent cache {shards} holds text embeddings of another text encoder (weights "
                          f"{fingerprint}, the run's {ours}): the run would train on "
                          "them, not on its own encoder's features. Cache again with this run's text encoder "
                          "(--text-encoder-config/--text-encoder), or make it trainable")


def cache_precision(cfg: DictConfig) -> str:
    """``ldm_stage.cache_precision``, or when null the precision the training run encodes images in without the
    cache (its frozen VAE runs under the trainer's autocast): bfloat16 under bf16, float32 under 32-true."""
    chosen = cfg.ldm_stage.get("cache_precision")
    if chosen is not None:
        return chosen
    precision = resolve_precision(cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator", "auto"))
    return autocast_precision(precision)


# ---------------------------------------------------------------------------------------------------- stages


def seed_stage(cfg: DictConfig) -> None:
    """Seed the global generators (model initialisation, data order) with the run's seed at the start of a stage, so
    that a stage trains the same model whether or not an earlier stage ran in this process: the ldm stage of a whole
    run, of ``stages=[ldm] vae_ckpt=RUN/vae/vae.ckpt`` and of a run resumed after its vae stage are one model."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)


def train_vae(cfg: DictConfig, out: Path, resume: str | None = None, resume_step: int | None = None) -> Path:
    """Train the autoencoder, fit its latent normalisation, and write ``out/vae/vae.ckpt``."""
    seed_stage(cfg)
    s = cfg.vae_stage
    vae = instantiate(cfg.autoencoder)
    module = AutoencoderModule(
        vae, lr=s.lr, betas=tuple(s.betas), rec_loss=s.rec_loss, kl_weight=s.kl_weight,
        perceptual_weight=s.perceptual_weight, perceptual_weights=s.perceptual_weights, disc_start=s.disc_start,
        disc_weight=s.disc_weight, disc_channels=s.disc_channels, disc_layers=s.disc_layers,
        scale_equivariance=s.scale_equivariance, lr_schedule=s.lr_schedule, max_steps=s.max_steps, seed=cfg.seed,
        gradient_clip_val=s.get("gradient_clip_val"),
    )
    data = make_data(cfg, s)
    stage_dir = out / "vae"
    headline(f"vae stage: {s.max_steps} steps at batch {s.batch_size}; {parts_summary(module)}; output {stage_dir}")
    save_config(cfg, stage_dir)
    trainer = make_trainer(cfg, stage_dir, s.max_steps, make_callbacks(cfg.callbacks.get("vae")),
                           make_logger(cfg, "vae", stage_dir, resume_step), manual=True)
    module.refuse_unsupported(trainer)  # here, before fit launches the ranks and joins the process group
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    seconds = time.perf_counter() - t0
    finish_fit(cfg, trainer)
    # Diffusion trains on unit-variance latents: fit the normalisation on a few batches of training images.
    loader = data.train_dataloader()
    loader.continue_at_next_epoch()  # the same batches after a fit that trained to its end or resumed there
    images = [b["image"] for b, _ in zip(loader, range(s.latent_scale_batches), strict=False)]  # buckets: sizes vary
    fitted = module.fit_latent_normalization(images, per_channel=s.latent_normalization == "per_channel")
    path = stage_dir / "vae.ckpt"
    if trainer.is_global_zero:
        save_autoencoder(path, vae, OmegaConf.to_container(cfg, resolve=True))
    trainer.strategy.barrier()  # the other ranks read vae.ckpt (rank 0's scale) in the ldm stage
    rank_zero_info(f"vae stage: {seconds:.0f} s, {_last_metrics(trainer, 'train/loss', 'train/psnr')}, {fitted}; "
                   f"saved {path}")
    if "ldm" in cfg.stages:  # a signal after the stage's last step, or during the normalisation fit: stop here
        stop_if_signalled(cfg, trainer, path)
    return path


def build_first_stage(cfg: DictConfig, vae_path: Path | None, resume: str | None, sd, init_ckpt: str | None):
    """The frozen first stage of the ldm stage: the resumed checkpoint's, the VAE trained in this run or
    ``vae_ckpt``, the SD file's, or None in pixel space."""
    if resume is not None:
        # The checkpoint holds the first stage: no separate VAE file is needed. It is loaded here, not left to
        # Lightning's restore in fit(): the latent cache encodes before fit.
        return load_first_stage(resume)
    if cfg.first_stage == "pixel":
        return None
    if cfg.first_stage != "vae":
        raise ConfigError(f"first_stage must be 'vae' or 'pixel', got {cfg.first_stage!r}")
    vae_path = vae_path or (Path(cfg.vae_ckpt) if cfg.vae_ckpt else None)
    if vae_path is not None:  # a VAE trained in this run, or vae_ckpt, takes precedence over the SD file's
        return load_autoencoder(vae_path)
    if sd is None:
        raise ConfigError(NO_AUTOENCODER)
    normalization = sd_latent_normalization(sd, cfg.autoencoder, init_ckpt)
    vae = instantiate(cfg.autoencoder, **normalization)
    load_sd_vae(sd, init_ckpt, vae)
    described = ", ".join(f"{key} {value}" for key, value in normalization.items() if value is not None)
    rank_zero_info(f"init_ckpt: VAE weights from {init_ckpt}, {described}")
    return vae


def export_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, path: Path) -> None:
    """Write a LoRA run's adapters in the diffusers format (``sample.py lora=PATH``, diffusers'
    ``load_lora_weights``); a model diffusers cannot express is named in a warning instead."""
    try:
        save_lora(unet, path, format="diffusers", text_encoder=text_encoder)
        rank_zero_info(f"ldm_stage.lora: adapters written to {path} (diffusers format)")
    except ConfigError as err:
        warnings.warn(f"the adapters could not be written as a diffusers LoRA file: {err}", stacklevel=2)


def lora_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """``ldm_stage.lora`` as a plain dict when it asks for adapters (a rank), else None (full fine-tuning)."""
    return OmegaConf.to_container(cfg.ldm_stage.lora, resolve=True) if is_lora_run(cfg) else None


def apply_lora(cfg: DictConfig, lora: dict[str, Any], unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
               init_ckpt: str | None, resume: str | None) -> dict[str, str]:
    """Add the LoRA adapters of ``ldm_stage.lora`` to the UNet (and the text encoder with ``text_encoder: true``);
    everything else stays frozen. Returns the base file's reference (path, sha256) the checkpoints record.

    The base is ``init_ckpt`` alone (UNet, VAE, text encoder): a LoRA checkpoint stores no base weights, so the
    parts it is trained on must all come from that file."""
    check_lora_run(cfg, init_ckpt)  # as the config check did (a caller may not have run it)
    if lora.get("text_encoder") and text_encoder is None:
        raise ConfigError("ldm_stage.lora.text_encoder=true but the model has no text encoder")
    if resume is not None:  # the base must be the file the adapters were trained on
        base = read_checkpoint(resume)["ldm"].get("lora")
        if base is None:
            raise ConfigError(f"resume={resume} is a full checkpoint, not a LoRA run's: drop ldm_stage.lora")
        check_lora_base(base["base"], f"resume={resume}")
        sha = base["base"]["sha256"]
    else:
        sha = file_sha256(init_ckpt)
    kwargs = {k: lora.get(k) for k in ("rank", "alpha")} | {"dropout": float(lora.get("dropout") or 0.0)}
    add_lora(unet, targets=lora.get("targets"), **kwargs)
    if text_encoder is not None:
        if lora.get("text_encoder"):
            text_encoder.frozen = False  # no cached null embedding while its adapters train
            add_lora(text_encoder, **kwargs)
        else:
            text_encoder.frozen = True
    trained = sum(p.numel() for m in (unet, text_encoder) if m is not None for p in m.parameters() if p.requires_grad)
    rank_zero_info(f"ldm_stage.lora: rank {lora['rank']}, {trained:,} adapter parameters on the frozen base "
                   f"{init_ckpt}")
    return {"path": str(Path(init_ckpt).resolve()), "sha256": sha}


def check_base_objective(sd: SDCheckpoint, objective: DiffusionLoss | FlowMatchingLoss, init_ckpt: str,
                         lora: bool) -> None:
    """The base's recorded objective (an ldm checkpoint's, or an SD file's ldm metadata) against the run's
    ``diffusion`` group. A LoRA run on another one is refused: the frozen base predicts one target and the adapters
    would be trained towards another (and the checkpoint would name the wrong schedule for sampling). A full
    fine-tune may change the objective on purpose (SD 2.x moved to v-prediction so): a warning names it."""
    schedule, prediction_type = recorded_objective(objective)
    differ = []
    if sd.prediction_type is not None and sd.prediction_type != prediction_type:
        differ.append(f"prediction_type {sd.prediction_type!r}, the run's {prediction_type!r}")
    if sd.schedule is not None and dict(sd.schedule) != schedule:
        differ.append(f"schedule {dict(sd.schedule)}, the run's {schedule}")
    if not differ:
        return
    said = f"init_ckpt={init_ckpt} was trained with {'; '.join(differ)} (the diffusion group)"
    if lora:
        raise ConfigError(f"{said}: LoRA adapters on a frozen base must train on its objective. Set the diffusion "
                          "group to the base's (e.g. diffusion=sd_eps for SD 1.x)")
    rank_zero_warn(f"{said}: the fine-tune moves the base to the run's objective; if that is not intended, set the "
                   "diffusion group to the base's")


def build_optimizer(cfg: DictConfig):
    """``cfg.optimizer``: a partial that the module calls with its parameters. ``fused: null`` becomes ``fused:
    true`` (one kernel for the whole step, and the on-device skip of non-finite steps of ``ldm.lightning.nonfinite``),
    except under fp16, whose gradient scaler Lightning will not combine with clipping a fused optimizer; there it
    stays null (torch's per-tensor-group loop)."""
    opt = cfg.optimizer
    if "fused" in opt and opt.fused is None and not str(cfg.trainer.get("precision", "32")).startswith("16"):
        return instantiate(opt, fused=True)
    return instantiate(opt)


def build_diffusion_module(cfg: DictConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
                           first_stage: torch.nn.Module | None,
                           lora_base: dict[str, str] | None = None) -> LatentDiffusionModule:
    """LatentDiffusionModule from the ``diffusion`` (a noise schedule and prediction target, or ``objective:
    flow_matching``), ``optimizer``, ``ldm_stage`` and ``sampling`` groups. A LoRA run (``lora_base``) keeps no
    EMA: the adapters train at a fine-tuning learning rate for few steps, and the checkpoint stays adapters-only."""
    s = cfg.ldm_stage
    loss = diffusion_objective(cfg.diffusion)
    text_cfg = cfg.get("text_encoder")
    return LatentDiffusionModule(
        unet, text_encoder, first_stage, loss=loss, optimizer=build_optimizer(cfg),
        lr_schedule=LRSchedule(s.lr_schedule, s.warmup_steps, s.max_steps, s.lr_decay_fraction),
        ema=EMASettings(s.ema_decay, s.ema_warmup) if s.ema_decay is not None and lora_base is None else None,
        sampling=run_sampling(cfg),
        caption_dropout=s.caption_dropout, nan=NaNPolicy(s.nan_policy, s.max_nan_skips),
        guide_snapshot_step=s.guide_snapshot_step,
        text_encoder_kwargs=OmegaConf.to_container(text_cfg, resolve=True) if text_cfg else None,
        run_config=OmegaConf.to_container(cfg, resolve=True), seed=cfg.seed,
        validation=ValidationSettings(s.get("val_timesteps", DEFAULT_NUM_TIMESTEPS), s.get("val_seed", 0)),
        lora_base=lora_base, inpainting=inpainting_settings(cfg),
    )


def inpainting_settings(cfg: DictConfig) -> MaskSettings:
    """``ldm_stage.inpainting`` (the masks an inpainting UNet trains on) as ``MaskSettings``; defaults when absent."""
    block = cfg.ldm_stage.get("inpainting")
    values = OmegaConf.to_container(block, resolve=True) if block is not None else {}
    return MaskSettings(**values)


def train_ldm(cfg: DictConfig, out: Path, vae_path: Path | None, resume: str | None = None,
              resume_step: int | None = None) -> Path:
    """Train the latent diffusion model on the frozen first stage; returns ``out/ldm/checkpoints/last.ckpt``."""
    seed_stage(cfg)
    s = cfg.ldm_stage
    if resume is None and OmegaConf.is_missing(cfg, "init_ckpt"):
        raise ConfigError(INIT_CKPT_REQUIRED)
    lora = lora_settings(cfg)
    # a resumed run has its weights already; a LoRA run's checkpoint has only the adapters: the base loads again
    init_ckpt = cfg.get("init_ckpt") if resume is None or lora is not None else None
    heads = {k: cfg.unet[k] for k in ("num_heads", "num_head_channels") if k in cfg.unet}  # the run declares them
    sd = load_init_checkpoint(init_ckpt, unet_kwargs=heads) if init_ckpt else None
    if sd is not None and (sd.vae is None) != (cfg.first_stage == "pixel"):
        raise ConfigError(f"init_ckpt={init_ckpt} is a {'pixel-space' if sd.vae is None else 'latent'} model but "
                          f"first_stage={cfg.first_stage!r}: set first_stage={'pixel' if sd.vae is None else 'vae'}")
    first_stage = build_first_stage(cfg, vae_path, None if lora is not None else resume, sd, init_ckpt)
    text_cfg = cfg.get("text_encoder")
    text_encoder = instantiate(text_cfg) if text_cfg else None
    unet = instantiate(cfg.unet, gradient_checkpointing=s.gradient_checkpointing)
    if sd is not None:
        check_base_objective(sd, diffusion_objective(cfg.diffusion), init_ckpt, lora is not None)
    if sd is not None and lora is not None and sd.unet.in_channels < unet.in_channels:
        raise ConfigError(f"unet.in_channels={unet.in_channels} widens init_ckpt's {sd.unet.in_channels}-channel UNet, "
                          "but ldm_stage.lora freezes the base: the new input channels (the inpainting mask and "
                          "masked image) would stay zero and the model would ignore them. Widen with a full "
                          "fine-tune first (experiment=quickstart_inpaint), or train the LoRA on an inpainting base")
    if sd is not None:  # before the module is built, so its EMA starts from these weights
        pretrained = text_cfg is not None and (text_cfg.get("pretrained_path") is not None
                                               or text_cfg.get("pretrained") is not None)
        loaded = init_from_sd(sd, init_ckpt, unet, text_encoder, text_encoder_pretrained=pretrained)
        rank_zero_info(f"init_ckpt: {', '.join(loaded)} weights from {init_ckpt}")
        del sd
    lora_base = apply_lora(cfg, lora, unet, text_encoder, init_ckpt, resume) if lora is not None else None
    if s.compile:
        compile_in_place(unet)
    f = first_stage.downsample_factor if first_stage is not None else 1
    size = cfg.sampling.get("image_size") or cfg.data.image_size
    latent_shape = [first_stage.embed_dim if first_stage is not None else cfg.unet.out_channels, size // f, size // f]
    if s.cache_latents and unet.in_channels == 2 * latent_shape[0] + 1:
        raise ConfigError(f"unet.in_channels={unet.in_channels} is an inpainting UNet, which encodes each masked image "
                          "while training: set ldm_stage.cache_latents=false")
    data_overrides = {}
    if s.cache_latents:
        if first_stage is None:
            raise ConfigError("ldm_stage.cache_latents=true needs a VAE first stage (first_stage=vae), not pixel space")
        headline("latent cache: encoding the image shards once with the frozen VAE")
        make_data(cfg, s).prepare_data()  # the image shards must exist before they are encoded
        t0 = time.perf_counter()
        precision, compile_encoder = cache_precision(cfg), s.get("cache_compile", False)

        def encode(shards: str, folder: str) -> Path:
            return cache_for_vae(shards, out / folder, first_stage, cfg.data.image_size,
                                 cfg.data.get("image_mode", "RGB"), s.cache_batch_size, precision, compile_encoder)

        cache = encode(cfg.data.train_shards, "latents")
        data_overrides = {"source": "latents", "train_shards": str(cache)}
        if cfg.data.get("val_shards") is not None:  # the validation images are encoded once too (their mean is used)
            data_overrides["val_shards"] = str(encode(cfg.data.val_shards, "latents_val"))
        rank_zero_info(f"latent cache: {cache} ({time.perf_counter() - t0:.0f} s)")
    check_cache_shape(cfg, latent_shape)
    check_cache_text(cfg, text_encoder)
    module = build_diffusion_module(cfg, unet, text_encoder, first_stage, lora_base)
    if getattr(unet, "num_classes", None) is not None:  # its labels are checked on the host, batch by batch
        data_overrides["num_classes"] = unet.num_classes
    data = make_data(cfg, s, **data_overrides)
    stage_dir = out / "ldm"
    headline(f"ldm stage: {s.max_steps} steps at batch {s.batch_size}; {parts_summary(module)}; output {stage_dir}")
    save_config(cfg, stage_dir)
    trainer = make_trainer(with_validation(cfg), stage_dir, s.max_steps, make_callbacks(cfg.callbacks.get("ldm")),
                           logger=False)
    stop_if_signalled(cfg, trainer)  # a signal while the weights loaded or the latents were cached
    trainer.logger = make_logger(cfg, "ldm", stage_dir, resume_step)  # after it: a stopped stage starts no logger run
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    seconds = time.perf_counter() - t0
    finish_fit(cfg, trainer)
    if lora_base is not None and trainer.is_global_zero:  # the adapters as the SD ecosystem reads them
        export_lora(unet, text_encoder, stage_dir / "lora.safetensors")
    last = stage_dir / "checkpoints" / "last.ckpt"
    rank_zero_info(f"ldm stage: {seconds:.0f} s, {_last_metrics(trainer, 'train/loss')}; saved {last}")
    return last


def run(cfg: DictConfig, checked: bool = False) -> dict[str, Path]:
    """Check the whole config, then run the configured stages in the run folder, which one training holds at a
    time; returns the checkpoint paths by stage. ``checked``: the caller has passed ``cfg`` through ``check_run``
    already (train.py does, before importing Lightning), so its files are not read twice."""
    log_to_run_file()
    if not checked:
        check_run(cfg)
    resume = find_resume(cfg)
    out = Path(cfg.out_dir) if resume is None or resume[3] is None else resume[3]
    if resume is not None:
        cfg = resume_config(cfg, out / resume[0], command_line_overrides())
        check_run(cfg)
    check_latent_source(cfg, resume)
    lock = RunLock(out) if rank_zero_only.rank == 0 else nullcontext()
    p = cfg.get("preemption")
    with lock, (record_signals(p.signal) if p is not None else nullcontext()):
        if resume is None:
            refuse_earlier_run(cfg, out)
        return _run_stages(cfg, out, resume)


def refuse_earlier_run(cfg: DictConfig, out: Path) -> None:
    """A fresh run must not write into the stage folders of an earlier one: its ``last.ckpt`` would stay the earlier
    model's (Lightning versions the new file ``last-v1.ckpt``) beside the new run's config. ConfigError naming the
    files and the two ways on."""
    found = []
    if "vae" in cfg.stages:
        found += [out / "vae" / "vae.ckpt"] if (out / "vae" / "vae.ckpt").is_file() else []
        found += sorted((out / "vae" / "checkpoints").glob("*.ckpt"))
    if "ldm" in cfg.stages:
        found += sorted((out / "ldm" / "checkpoints").glob("*.ckpt"))
    found = [f for f in found if _loads(f)]  # a damaged file is no run to continue (resume=auto starts afresh)
    if found:
        shown = ", ".join(str(f.relative_to(out)) for f in found[:3]) + (", ..." if len(found) > 3 else "")
        ways = "continue it with resume=last, or give this run another folder (hydra.run.dir=..., or hydra.sweep.dir " \
               "for a sweep)"
        vae = out / "vae" / "vae.ckpt"
        if "ldm" in cfg.stages and vae in found and not any("ldm" in f.parts for f in found):
            ways += f"; or train the ldm stage alone on its autoencoder: stages=[ldm] vae_ckpt={vae}"
        raise ConfigError(f"{out} already holds a run ({shown}): {ways}")


def _loads(path: Path) -> bool:
    """Whether a checkpoint file reads (memory-mapped: its header only)."""
    try:
        read_checkpoint(path, mmap=True)
    except Exception:  # truncated or corrupt: any error torch's reader raises
        return False
    return True


def stop_if_signalled(cfg: DictConfig, trainer: L.Trainer, checkpoint: Path | str | None = None) -> None:
    """Between stages: stop the run (``Preempted``) if a preemption signal came since it started."""
    if cfg.get("preemption") is not None:
        stop_between_stages(trainer, cfg.preemption.signal, checkpoint, bool(cfg.preemption.requeue))


JUDGES = {"shapes": "ldm.eval.shapes", "mnist": "ldm.eval.mnist"}


def judge_lines(cfg: DictConfig, ckpt: Path) -> list[str]:
    """The closing summary's judge command: the built-in dataset's own judge (an inpainting UNet on shapes: the
    inpainting judge), none for other data."""
    source = (cfg.get("dataset") or {}).get("source")
    if source not in JUDGES:
        return []
    module = JUDGES[source]
    if source == "shapes" and cfg.unet.get("in_channels", 4) > cfg.unet.get("out_channels", 4):
        module = "ldm.eval.shapes_inpaint"
    return [f"  judge ({source}): python -m {module} {ckpt}"]


def _run_stages(cfg: DictConfig, out: Path, resume: tuple[str, str, int, Path | None] | None) -> dict[str, Path]:
    results: dict[str, Path] = {}
    vae_path = None
    if resume is not None:
        stage, path, step, _ = resume
        limit = (cfg.vae_stage if stage == "vae" else cfg.ldm_stage).max_steps
        # a vae stage is done once vae.ckpt is written, after its last checkpoint (the normalisation fit between
        # them may have been cut short): without it, the resume fits and writes it
        vae_written = (out / "vae" / "vae.ckpt").is_file()
        if step >= limit and (stage == "ldm" or ("ldm" not in cfg.stages and vae_written)):
            headline(f"the {stage} stage of {out} finished at step {step} (max_steps={limit}): nothing to resume")
            return results
        if step >= limit and vae_written:  # the vae stage is done: on to the ldm stage
            vae_path, resume = out / "vae" / "vae.ckpt", None
            rank_zero_info(f"the vae stage finished at step {step}; the ldm stage starts from {vae_path}")
        else:
            rank_zero_info(f"resumed from {path} at step {step}")
    if "vae" in cfg.stages and vae_path is None and (resume is None or resume[0] == "vae"):
        results["vae"] = train_vae(cfg, out, *((resume[1], resume[2]) if resume else ()))
    if "ldm" in cfg.stages:
        ldm_resume = (resume[1], resume[2]) if resume and resume[0] == "ldm" else ()
        results["ldm"] = train_ldm(cfg, out, results.get("vae") or vae_path, *ldm_resume)
    lines = [f"  {stage}: {path}" for stage, path in results.items()]
    if cfg.get("logger") is not None and cfg.logger.get("save_dir"):
        lines.append(f"  logs ({cfg.logger._target_.rsplit('.', 1)[-1]}): {cfg.logger.save_dir}")
    if "ldm" in results:
        lines += [f"  sample grids: {out / 'ldm' / 'samples'}",
                  f"  sample: python sample.py ckpt={results['ldm']} prompt=\"...\"",
                  *judge_lines(cfg, results["ldm"])]
    headline("done: " + ("\n" + "\n".join(lines) if lines else "no stage ran"))
    return results
