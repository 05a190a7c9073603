"""Train ldm: the autoencoder stage, then the latent diffusion stage.

    python train.py                                  # the quickstart: shapes, 32 px, CPU, ~10 minutes
    python train.py experiment=mnist_pixel_ddpm      # another preset
    python train.py -m optimizer.lr=1e-4,3e-4 unet=tiny,small   # a sweep, one directory per job
    python train.py resume=PATH|last                 # exact resume (optimizer, EMA, LR, data position, RNG)

Hydra instantiates the parts here, at the edge; everything below takes plain objects.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import AtomicCheckpointIO, atomic_torch_save, build_module, module_spec
from ldm.lightning.autoencoder_module import AutoencoderModule
from ldm.lightning.callbacks import SampleGrid, Throughput
from ldm.lightning.diffusion_module import LatentDiffusionModule


def prepare_data(cfg: DictConfig) -> None:
    """Write the built-in dataset's shards once (rank 0), if the config names one and they are missing."""
    build = cfg.get("dataset")
    if not build:
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


def save_config(cfg: DictConfig, stage_dir: Path) -> None:
    """The resolved config beside the stage's checkpoints (rank 0 only: under DDP the others reuse the path)."""
    if rank_zero_only.rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def make_trainer(
    cfg: DictConfig, stage_dir: Path, max_steps: int, callbacks: list, logger, manual: bool = False
) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
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
    return instantiate(cfg.logger, **({"name": name} if "name" not in cfg.logger else {}))


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


def train_vae(cfg: DictConfig, out: Path, resume: str | None = None) -> Path:
    s = cfg.vae_stage
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
    )
    data = instantiate(cfg.data, batch_size=s.batch_size, num_workers=s.num_workers)
    stage_dir = out / "vae"
    save_config(cfg, stage_dir)
    ckpt_cb = ModelCheckpoint(dirpath=stage_dir / "checkpoints", save_last=True, every_n_train_steps=500)
    trainer = make_trainer(cfg, stage_dir, s.max_steps, [ckpt_cb, Throughput()], make_logger(cfg, "vae"), manual=True)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    rank_zero_info(f"vae stage: {time.perf_counter() - t0:.0f} s")
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
    rank_zero_info(f"vae: latent scale {scale:.4f}; saved {path}")
    return path


def train_ldm(cfg: DictConfig, out: Path, vae_path: Path | None, resume: str | None = None) -> Path:
    s = cfg.ldm_stage
    first_stage = None
    if resume is not None:
        # The checkpoint holds the first stage's architecture and weights: no separate VAE file is needed.
        spec = torch.load(resume, map_location="cpu", weights_only=False)["ldm"]["first_stage"]
        first_stage = build_module(spec) if spec is not None else None
    elif cfg.first_stage == "vae":
        vae_path = vae_path or (Path(cfg.vae_ckpt) if cfg.vae_ckpt else None)
        if vae_path is None:
            raise ValueError(
                "the ldm stage needs an autoencoder: set vae_ckpt=PATH (vae/vae.ckpt of a vae-stage run), run both "
                "stages (stages=[vae,ldm]), or train in pixel space (first_stage=pixel)"
            )
        first_stage = load_vae(vae_path)
    elif cfg.first_stage != "pixel":
        raise ValueError(f"first_stage must be 'vae' or 'pixel', got {cfg.first_stage!r}")
    text_cfg = cfg.get("text_encoder")
    text_encoder = instantiate(text_cfg) if text_cfg else None
    unet = instantiate(cfg.unet, gradient_checkpointing=s.gradient_checkpointing)
    if s.compile:
        unet = torch.compile(unet)
    sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    f = first_stage.downsample_factor if first_stage is not None else 1
    sampling["latent_shape"] = [cfg.unet.in_channels, sampling["image_size"] // f, sampling["image_size"] // f]
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
        caption_dropout=s.caption_dropout,
        optimizer=instantiate(cfg.optimizer),
        lr_schedule=s.lr_schedule,
        warmup_steps=s.warmup_steps,
        max_steps=s.max_steps,
        ema_decay=s.ema_decay,
        ema_warmup=s.ema_warmup,
        nan_policy=s.nan_policy,
        max_nan_skips=s.max_nan_skips,
        sampling={k: v for k, v in sampling.items() if k not in ("prompts", "log_every_n_steps", "seed")},
        text_encoder_kwargs=OmegaConf.to_container(text_cfg, resolve=True) if text_cfg else None,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        seed=cfg.seed,
    )
    data = instantiate(cfg.data, batch_size=s.batch_size, num_workers=s.num_workers)
    stage_dir = out / "ldm"
    save_config(cfg, stage_dir)
    callbacks = [
        ModelCheckpoint(
            dirpath=stage_dir / "checkpoints", save_last=True, every_n_train_steps=s.checkpoint_every_n_steps
        ),
        Throughput(),
        SampleGrid(cfg.sampling.prompts, cfg.sampling.log_every_n_steps, stage_dir / "samples", cfg.sampling.seed),
    ]
    trainer = make_trainer(cfg, stage_dir, s.max_steps, callbacks, make_logger(cfg, "ldm"))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    rank_zero_info(f"ldm stage: {time.perf_counter() - t0:.0f} s")
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
