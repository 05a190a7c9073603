"""Train ldm: the autoencoder stage, then the latent diffusion stage.

    python train.py                                  # the quickstart: shapes, 32 px, CPU, ~11 minutes
    python train.py experiment=mnist_pixel_ddpm      # another preset
    python train.py -m optimizer.lr=1e-4,3e-4 unet=tiny,small   # a sweep, one directory per job
    python train.py resume=PATH|last                 # exact resume (optimizer, EMA, LR, data position, RNG)

Hydra instantiates the parts here, at the edge; everything below takes plain objects.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import AtomicCheckpointIO, atomic_torch_save, build_module, module_spec
from ldm.convert import (
    SDCheckpoint,
    load_sd_checkpoint,
    load_sd_text_encoder,
    load_state_dict_checked,
    sd_text_family,
)
from ldm.data.cache_latents import cache_latents
from ldm.lightning.autoencoder_module import AutoencoderModule
from ldm.lightning.callbacks import ReconstructionGrid, SampleGrid, StageCheckpoint, Throughput
from ldm.lightning.diffusion_module import LatentDiffusionModule


def prepare_data(cfg: DictConfig) -> None:
    """Write the built-in dataset's shards once (rank 0), if the config names one and they are missing."""
    build = cfg.get("dataset")
    if not build or cfg.data.get("source", "images") == "latents":  # a latent cache comes from cache_latents
        return
    out = Path(build.out)
    if (out / "index.json").exists():
        return
    from ldm.data.make_shards import make_shards

    if rank_zero_only.rank == 0:
        make_shards(
            build.source,
            out,
            maxcount=build.maxcount,
            size=build.get("size"),
            length=build.get("length"),
            seed=build.get("seed", 0),
        )


def check_latent_source(cfg: DictConfig, resume: tuple[str, str] | None) -> None:
    """``data.source=latents`` (a cache of ``python -m ldm.data.cache_latents``) feeds the ldm stage only, on the
    VAE whose latents were cached (``vae_ckpt``: its latent scale, and the decoder for samples)."""
    if cfg.data.get("source", "images") != "latents":
        return
    how = (
        "Train the VAE on image shards (stages=[vae], data.source=images), cache its latents (python -m "
        "ldm.data.cache_latents SHARDS CACHE --vae RUN/vae/vae.ckpt --size S), then train with data.source=latents "
        "data.train_shards=CACHE stages=[ldm] vae_ckpt=RUN/vae/vae.ckpt (or data=shapes_latents)."
    )
    if "vae" in cfg.stages and (resume is None or resume[0] == "vae"):
        raise ValueError(f"data.source=latents reads cached latents, but the vae stage trains on images. {how}")
    if cfg.first_stage != "vae":
        raise ValueError(f"data.source=latents needs first_stage=vae (cached latents are VAE latents). {how}")
    if resume is None and not cfg.vae_ckpt:
        raise ValueError(
            "data.source=latents needs vae_ckpt=PATH: the vae.ckpt whose latents were cached. The ldm stage applies "
            f"its latent scale to the cached latents and decodes samples with it. {how}"
        )
    shards = cfg.data.train_shards
    if isinstance(shards, str) and "{" not in shards and not Path(shards).exists():
        raise FileNotFoundError(f"data.train_shards={shards}: no latent cache there. {how}")


def check_cache_shape(cfg: DictConfig, latent_shape: list[int]) -> None:
    """Refuse a latent cache whose latents do not have the shape the UNet and the sampler will use."""
    shards = cfg.data.get("train_shards")
    if cfg.data.get("source", "images") != "latents" or not isinstance(shards, str):
        return
    index = Path(shards) / "index.json"
    cached = json.loads(index.read_text()).get("latents", {}).get("shape") if index.is_file() else None
    if cached is not None and list(cached) != list(latent_shape):
        raise ValueError(
            f"the latent cache {shards} holds latents of shape {cached}, but this run trains on {latent_shape} "
            "(unet.in_channels, data.image_size / the VAE's downsampling): set data.image_size to the cached size, "
            "or cache again with the matching VAE and --size"
        )


def cache_run_latents(cfg: DictConfig, out: Path, vae: torch.nn.Module) -> Path:
    """``ldm_stage.cache_latents``: encode the image shards once with the frozen ``vae`` into a latent cache under the
    run directory, so the ldm stage skips the VAE encoder and the image decoding on every step.

    The cache folder is named by a fingerprint of the VAE's weights: a resumed run finds its cache again, and a run
    directory reused with another VAE never reads latents of the old one.
    """
    if cfg.data.get("source", "images") != "images":
        raise ValueError("ldm_stage.cache_latents=true encodes image shards, but data.source is "
                         f"{cfg.data.get('source')!r}: the data is a latent cache already; set ldm_stage.cache_latents"
                         "=false")
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if str(devices) != "1" or str(nodes) != "1":
        raise ValueError(
            f"ldm_stage.cache_latents=true runs in one process (trainer.devices={devices}, num_nodes={nodes}; the "
            "quickstart preset turns it on). Set ldm_stage.cache_latents=false to encode images on the fly, or cache "
            "once beforehand (python -m ldm.data.cache_latents SHARDS CACHE --vae RUN/vae/vae.ckpt --size S) and "
            "train with data.source=latents data.train_shards=CACHE"
        )
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    cache = out / "latents" / digest.hexdigest()[:16]
    t0 = time.perf_counter()
    cache_latents(cfg.data.train_shards, cache, vae, image_size=cfg.data.image_size,
                  image_mode=cfg.data.get("image_mode", "RGB"), batch_size=256, log=None)
    rank_zero_info(f"latent cache: {cache} ({time.perf_counter() - t0:.0f} s)")
    return cache


def save_config(cfg: DictConfig, stage_dir: Path) -> None:
    """The resolved config beside the stage's checkpoints (rank 0 only: under DDP the others reuse the path)."""
    if rank_zero_only.rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def make_trainer(
    cfg: DictConfig, stage_dir: Path, max_steps: int, callbacks: list, logger, manual: bool = False
) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(kwargs.get("strategy"), dict):  # a strategy object (``_target_``), e.g. trainer=fsdp_cpu's
        kwargs["strategy"] = instantiate(kwargs["strategy"])
    if manual:  # manual optimisation (the VAE's two optimizers) does its own clipping, if any
        kwargs.pop("gradient_clip_val", None)
    return L.Trainer(
        **kwargs,
        max_steps=max_steps,
        default_root_dir=str(stage_dir),
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=True,
    )


def make_logger(cfg: DictConfig, name: str):
    if cfg.get("logger") is None:
        return False
    logger = instantiate(cfg.logger, **({"name": name} if "name" not in cfg.logger else {}))
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the run's config beside its curves
    return logger


def close_loggers(trainer: L.Trainer) -> None:
    """End each logger's run, so the next stage starts its own (WandbLogger would otherwise reuse the active run)."""
    for logger in trainer.loggers:
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()


def find_resume(cfg: DictConfig) -> tuple[str, str] | None:
    """(stage, path) to resume from: ``resume=PATH``, or ``resume=last`` (the newest last.ckpt under outputs/ and
    multirun/, diffusion stage first)."""
    if not cfg.resume:
        return None
    if cfg.resume == "last":
        for stage in ("ldm", "vae"):
            found = sorted(
                (p for root in ("outputs", "multirun") for p in Path(root).glob(f"**/{stage}/checkpoints/last.ckpt")),
                key=lambda p: p.stat().st_mtime,
            )
            if found:
                return stage, str(found[-1])
        raise FileNotFoundError("resume=last: no */checkpoints/last.ckpt under outputs/ or multirun/")
    path = Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ("ldm" if "ldm" in ckpt else "vae"), str(path)


def load_vae(path: str | Path) -> torch.nn.Module:
    """Rebuild the autoencoder saved by the VAE stage."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"vae_ckpt={path} does not exist. Train an autoencoder first (python train.py stages=[vae]) and pass its "
            "vae/vae.ckpt as vae_ckpt=PATH, or run both stages (stages=[vae,ldm])."
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("kind") != "autoencoder":
        raise ValueError(f"vae_ckpt={path} is not an autoencoder checkpoint (written by the vae stage as vae.ckpt)")
    vae = build_module(ckpt["spec"])
    vae.load_state_dict(ckpt["state_dict"])
    return vae


SD_LATENT_SCALE = 0.18215  # Stable Diffusion 1.x / 2.x


def init_vae_from_sd(cfg: DictConfig, sd: SDCheckpoint, path: str) -> torch.nn.Module:
    """The autoencoder of ``cfg.autoencoder`` holding an SD single file's VAE weights (strict), with its latent
    scale from the file's ``scale_factor`` when present, else ``autoencoder.scale_factor`` (0.18215 in kl_f8)."""
    scale = sd.scale_factor
    if scale is None:
        scale = float(cfg.autoencoder.get("scale_factor", SD_LATENT_SCALE))
        if scale != SD_LATENT_SCALE:
            rank_zero_warn(
                f"init_ckpt={path} stores no scale_factor; using autoencoder.scale_factor={scale} "
                f"(Stable Diffusion 1.x/2.x use {SD_LATENT_SCALE})"
            )
    vae = instantiate(cfg.autoencoder, scale_factor=scale)
    load_state_dict_checked(vae, sd.vae.state_dict(), f"AutoencoderKL (autoencoder config vs init_ckpt={path})")
    rank_zero_info(f"init_ckpt: VAE weights from {path}, latent scale {scale}")
    return vae


def sd_text_state_dict(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD file's ``cond_stage_model.*`` weights under our text encoders' names: SD 1.x CLIP and SD 2.x open_clip
    through ``ldm.convert.load_sd_text_encoder``; any other layout (e.g. our own from-scratch tower) as stored."""
    if sd_text_family(cond) is None:
        return cond
    return load_sd_text_encoder(cond).state_dict()


def init_from_sd(
    cfg: DictConfig, sd: SDCheckpoint, path: str, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> None:
    """Load an SD single file's UNet (its EMA weights when present) and text encoder into ours, strictly."""
    load_state_dict_checked(unet, sd.unet.state_dict(), f"UNet (unet config vs init_ckpt={path})")
    if text_encoder is None:
        return
    if sd.cond_stage_state_dict:
        weights = sd_text_state_dict(sd.cond_stage_state_dict)
        load_state_dict_checked(text_encoder, weights, f"text encoder (text_encoder config vs init_ckpt={path})")
        rank_zero_info(f"init_ckpt: UNet and text encoder weights from {path}")
        return
    te = cfg.text_encoder
    if getattr(text_encoder, "frozen", False) and te.get("pretrained_path") is None and te.get("pretrained") is None:
        raise ValueError(
            f"init_ckpt={path} holds no text encoder (cond_stage_model.*) weights and the frozen text encoder has no "
            "pretrained weights of its own: set text_encoder.pretrained_path (or pretrained) to a local copy"
        )
    rank_zero_info(f"init_ckpt: UNet weights from {path}; the text encoder keeps its own weights")


def check_vae_strategy(cfg: DictConfig) -> None:
    """Refuse FSDP for the vae stage: its manual optimisation runs backward inside the FSDP-wrapped forward."""
    strategy = cfg.trainer.get("strategy", "")
    name = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    if "fsdp" in name.lower():
        raise ValueError(
            "the vae stage cannot train under FSDP: its two optimizers step by hand inside training_step, which FSDP "
            "runs inside the wrapped forward (backward there is not allowed). Train the VAE with trainer=ddp "
            "(stages=[vae]), then the LDM with trainer=fsdp stages=[ldm] vae_ckpt=RUN/vae/vae.ckpt"
        )


def train_vae(cfg: DictConfig, out: Path, resume: str | None = None) -> Path:
    s = cfg.vae_stage
    check_vae_strategy(cfg)
    vae = instantiate(cfg.autoencoder)
    module = AutoencoderModule(
        vae,
        lr=s.lr,
        betas=tuple(s.betas),
        rec_loss=s.rec_loss,
        kl_weight=s.kl_weight,
        perceptual_weight=s.perceptual_weight,
        perceptual_weights=s.perceptual_weights,
        disc_start=s.disc_start,
        disc_weight=s.disc_weight,
        lr_schedule=s.lr_schedule,
        max_steps=s.max_steps,
        seed=cfg.seed,
    )
    data = instantiate(cfg.data, batch_size=s.batch_size, num_workers=s.num_workers)
    stage_dir = out / "vae"
    save_config(cfg, stage_dir)
    ckpt_cb = StageCheckpoint(dirpath=stage_dir / "checkpoints", save_last=True, every_n_train_steps=500)
    throughput = Throughput(peak_flops=cfg.get("perf", {}).get("peak_flops"))
    recon = ReconstructionGrid(s.log_images_every_n_steps, stage_dir / "samples")
    trainer = make_trainer(cfg, stage_dir, s.max_steps, [ckpt_cb, throughput, recon], make_logger(cfg, "vae"),
                           manual=True)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    rank_zero_info(f"vae stage: {time.perf_counter() - t0:.0f} s")
    close_loggers(trainer)
    # Diffusion trains on unit-variance latents: fit the scale on a few batches of training images.
    loader = data.train_dataloader()
    images = torch.cat([b["image"] for b, _ in zip(loader, range(4), strict=False)])
    scale = module.fit_latent_scale(images)
    path = stage_dir / "vae.ckpt"
    if trainer.is_global_zero:
        atomic_torch_save(
            {
                "kind": "autoencoder",
                "spec": module_spec(vae),
                "state_dict": vae.state_dict(),
                "latent_scale": scale,
                "config": OmegaConf.to_container(cfg, resolve=True),
            },
            path,
        )
    trainer.strategy.barrier()  # the other ranks read vae.ckpt (rank 0's scale) in the ldm stage
    rank_zero_info(f"vae: latent scale {scale:.4f}; saved {path}")
    return path


def train_ldm(cfg: DictConfig, out: Path, vae_path: Path | None, resume: str | None = None) -> Path:
    s = cfg.ldm_stage
    first_stage = None
    if resume is None and OmegaConf.is_missing(cfg, "init_ckpt"):
        raise ValueError("init_ckpt=PATH is required: the Stable Diffusion single file (.safetensors/.ckpt) to load")
    init_ckpt = cfg.get("init_ckpt") if resume is None else None  # a resumed run has its weights already
    sd = load_sd_checkpoint(init_ckpt) if init_ckpt else None
    if sd is not None and cfg.first_stage != "vae":
        raise ValueError(f"init_ckpt (an SD single file) needs first_stage=vae, got {cfg.first_stage!r}")
    if resume is not None:
        # The checkpoint holds the first stage's architecture and weights: no separate VAE file is needed. The
        # weights are loaded here, not left to Lightning's restore in fit(): the latent cache encodes before fit.
        ckpt = torch.load(resume, map_location="cpu", weights_only=False)
        spec = ckpt["ldm"]["first_stage"]
        first_stage = build_module(spec) if spec is not None else None
        if first_stage is not None:
            prefix = "first_stage."
            weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
            load_state_dict_checked(first_stage, weights, "the checkpoint's first stage")
        del ckpt
    elif cfg.first_stage == "vae":
        vae_path = vae_path or (Path(cfg.vae_ckpt) if cfg.vae_ckpt else None)
        if vae_path is None and sd is None:
            raise ValueError(
                "the ldm stage needs an autoencoder: set vae_ckpt=PATH (vae/vae.ckpt of a vae-stage run), run both "
                "stages (stages=[vae,ldm]), start from an SD single file (init_ckpt=PATH), or train in pixel space "
                "(first_stage=pixel)"
            )
        # a VAE trained in this run, or vae_ckpt, takes precedence over the one inside init_ckpt
        first_stage = load_vae(vae_path) if vae_path is not None else init_vae_from_sd(cfg, sd, init_ckpt)
    elif cfg.first_stage != "pixel":
        raise ValueError(f"first_stage must be 'vae' or 'pixel', got {cfg.first_stage!r}")
    text_cfg = cfg.get("text_encoder")
    text_encoder = instantiate(text_cfg) if text_cfg else None
    unet = instantiate(cfg.unet, gradient_checkpointing=s.gradient_checkpointing)
    if sd is not None:  # before the module is built, so its EMA starts from these weights
        init_from_sd(cfg, sd, init_ckpt, unet, text_encoder)
        del sd
    if s.compile:  # in place: the module keeps its class and state-dict names, so checkpoints stay loadable
        unet.compile()
    sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    f = first_stage.downsample_factor if first_stage is not None else 1
    sampling["latent_shape"] = [cfg.unet.in_channels, sampling["image_size"] // f, sampling["image_size"] // f]
    data_overrides = {}
    if s.get("cache_latents", False):
        if first_stage is None:
            raise ValueError("ldm_stage.cache_latents=true needs a VAE first stage (first_stage=vae), not pixel space")
        data_overrides = {"source": "latents", "train_shards": str(cache_run_latents(cfg, out, first_stage))}
    check_cache_shape(cfg, sampling["latent_shape"])
    d = cfg.diffusion
    module = LatentDiffusionModule(
        unet,
        text_encoder,
        first_stage,
        schedule=OmegaConf.to_container(d.schedule, resolve=True),
        prediction_type=d.prediction_type,
        loss_weighting=d.loss_weighting,
        snr_gamma=d.snr_gamma,
        offset_noise=d.offset_noise,
        timestep_shift=d.get("timestep_shift", 1.0),
        caption_dropout=s.caption_dropout,
        optimizer=instantiate(cfg.optimizer),
        lr_schedule=s.lr_schedule,
        warmup_steps=s.warmup_steps,
        max_steps=s.max_steps,
        lr_decay_fraction=s.get("lr_decay_fraction", 0.2),
        ema_decay=s.ema_decay,
        ema_warmup=s.ema_warmup,
        nan_policy=s.nan_policy,
        max_nan_skips=s.max_nan_skips,
        sampling={k: v for k, v in sampling.items() if k not in ("prompts", "log_every_n_steps", "seed")},
        guide_snapshot_step=s.get("guide_snapshot_step"),
        text_encoder_kwargs=OmegaConf.to_container(text_cfg, resolve=True) if text_cfg else None,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        seed=cfg.seed,
    )
    data = instantiate(cfg.data, batch_size=s.batch_size, num_workers=s.num_workers, **data_overrides)
    stage_dir = out / "ldm"
    save_config(cfg, stage_dir)
    callbacks = [
        StageCheckpoint(
            dirpath=stage_dir / "checkpoints", save_last=True, every_n_train_steps=s.checkpoint_every_n_steps,
            save_top_k=-1 if s.get("keep_all_checkpoints", False) else 1,
        ),
        Throughput(peak_flops=cfg.get("perf", {}).get("peak_flops")),
        SampleGrid(cfg.sampling.prompts, cfg.sampling.log_every_n_steps, stage_dir / "samples", cfg.sampling.seed),
    ]
    trainer = make_trainer(cfg, stage_dir, s.max_steps, callbacks, make_logger(cfg, "ldm"))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    rank_zero_info(f"ldm stage: {time.perf_counter() - t0:.0f} s")
    close_loggers(trainer)
    last = stage_dir / "checkpoints" / "last.ckpt"
    rank_zero_info(f"ldm: checkpoint {last}; samples in {stage_dir / 'samples'}")
    return last


def run(cfg: DictConfig) -> dict[str, Path]:
    """Run the configured stages; returns the checkpoint paths."""
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.out_dir)
    prepare_data(cfg)
    results: dict[str, Path] = {}
    unknown = set(cfg.stages) - {"vae", "ldm"}
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; use stages=[vae], [ldm] or [vae,ldm]")
    resume = find_resume(cfg)
    check_latent_source(cfg, resume)
    if resume is not None:
        rank_zero_info(f"resuming the {resume[0]} stage from {resume[1]}")
    if "vae" in cfg.stages and (resume is None or resume[0] == "vae"):
        results["vae"] = train_vae(cfg, out, resume[1] if resume else None)
    if "ldm" in cfg.stages:
        ldm_resume = resume[1] if resume and resume[0] == "ldm" else None
        results["ldm"] = train_ldm(cfg, out, results.get("vae"), ldm_resume)
    return results


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
