"""AutoencoderModule: trains AutoencoderKL with reconstruction + KL, optional perceptual and PatchGAN losses."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ldm.autoencoder.losses import PatchDiscriminator, PerceptualLoss, adaptive_gan_weight, hinge_d_loss
from ldm.checkpoint import gather_rank_states, rank_state
from ldm.lightning.host_reads import host_scalar
from ldm.lightning.nonfinite import NaNPolicy, NonFiniteSteps, skips_on_device
from ldm.lightning.optim import grad_norm, warmup_then
from ldm.lightning.sharding import is_fsdp
from ldm.lightning.step_log import StepLog


class AutoencoderModule(L.LightningModule):
    """Manual optimisation with two optimizers (autoencoder, discriminator); the GAN starts at ``disc_start``.

    After training, ``fit_latent_normalization`` sets the VAE's latent normalisation (one scale, or each channel's
    mean and std) so that diffusion trains on unit-variance latents (Rombach et al., 2022, appendix G).

    The loss is the reconstruction error's per-pixel mean plus ``kl_weight`` x the KL summed over the latent.
    CompVis sums the reconstruction over the pixels instead, so their ``kl_weight`` w is w / (C x H x W) here.
    ``scale_equivariance`` > 0 adds that weight x the same reconstruction error of the 2x average-pooled latent
    sample, decoded, against the 2x average-pooled image (Skorokhodov et al., 2025, "Improving the Diffusability of
    Autoencoders"): it penalises the high-frequency latent content that a decoder does not need but a diffusion
    model must learn.

    A non-finite loss or gradient stops the run (``NonFiniteSteps`` with the ``stop`` policy). With the fused Adam
    optimizers (all precisions but fp16) each update's gradient norm is tested on the device and a non-finite one
    skips that update there, so the step never waits for a GPU; the error comes up to two steps later. Under fp16 the
    losses are tested on the host (a non-finite one stops the run at once) and the gradient scaler skips updates
    with non-finite gradients, as it does by design.

    Under DDP the autoencoder's gradients are averaged by DDP and the discriminator's by this module (DDP's reducer
    takes one backward per forward; a GAN batch has two), so every rank holds the same weights.
    """

    progress_bar_keys = ("train/loss", "train/psnr")  # what StepProgressBar shows, read at its refresh

    def __init__(
        self,
        vae: nn.Module,
        lr: float = 4.5e-6,
        betas: tuple[float, float] = (0.9, 0.99),
        rec_loss: str = "l1",
        kl_weight: float = 1e-6,
        perceptual_weight: float = 0.0,
        perceptual_weights: str | Sequence[str] | None = None,
        disc_weight: float = 0.5,
        disc_start: int | None = None,
        disc_channels: int = 64,
        disc_layers: int = 3,
        scale_equivariance: float = 0.0,
        lr_schedule: str = "constant",
        max_steps: int = 1,
        seed: int = 0,
        gradient_clip_val: float | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0 (None: no clipping), got {gradient_clip_val}")
        # Lightning clips in automatic optimisation only: this module clips its two optimizers' gradients itself
        self.gradient_clip_val = gradient_clip_val
        self._stepping: tuple[str, int, int] | None = None  # (which optimizer, step, batch size) while one steps
        self.step_log = StepLog()  # the step's training values, logged on the steps Lightning writes
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        self.vae = vae
        self.lr, self.betas = lr, tuple(betas)
        if not scale_equivariance >= 0.0:
            raise ValueError(f"scale_equivariance must be a weight >= 0 (0: off), got {scale_equivariance}")
        self.rec_loss, self.kl_weight, self.scale_equivariance = rec_loss, kl_weight, scale_equivariance
        self.perceptual_weight = perceptual_weight
        self.perceptual = PerceptualLoss(perceptual_weights) if perceptual_weight > 0 else None
        self.lr_factor = warmup_then(lr_schedule, 0, max_steps)
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_layers = disc_layers
        self.discriminator = None
        if disc_start is not None:
            self.discriminator = PatchDiscriminator(vae.config["out_channels"], disc_channels, disc_layers)
        # The posterior samples come from the module's own generator, saved in the checkpoint (exact resume); offset
        # by rank under DDP.
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.nonfinite = NonFiniteSteps(NaNPolicy("stop"), hint=(
            "Lower vae_stage.lr or the GAN's weight (vae_stage.disc_weight), or use bf16 rather than fp16."))

    def refuse_unsupported(self, trainer: L.Trainer | None) -> None:
        """Raise if ``trainer`` runs under FSDP, which this module cannot train under: its two optimizers step by hand
        inside ``training_step``, which FSDP runs inside the wrapped forward. ``train.py`` calls it before ``fit``
        launches the ranks; ``setup`` calls it for a Trainer built elsewhere."""
        if is_fsdp(trainer):
            raise ValueError(
                "the vae stage cannot train under FSDP: its two optimizers step by hand inside training_step, which "
                "FSDP runs inside the wrapped forward (backward there is not allowed). Train the VAE with trainer=ddp "
                "or on one device (stages=[vae]), then the LDM with trainer=fsdp stages=[ldm] "
                "vae_ckpt=RUN/vae/vae.ckpt")

    def setup(self, stage: str) -> None:
        self.refuse_unsupported(self._trainer)
        if self.global_rank:
            self.generator.manual_seed(self.seed + 1000003 * self.global_rank)
        if self._gan_on_ranks():
            # DDP's reducer expects one backward per forward, and a GAN batch has two in one training_step (the
            # generator's, whose loss also reaches the discriminator, then the discriminator's). So DDP leaves the
            # discriminator alone and this module averages its gradients itself (``_average_discriminator``).
            names = [f"discriminator.{n}" for n, _ in self.discriminator.named_parameters()]
            names += [f"discriminator.{n}" for n, _ in self.discriminator.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)

    def _gan_on_ranks(self) -> bool:
        """Whether the discriminator trains on several DDP ranks."""
        trainer = self._trainer
        return (self.discriminator is not None and trainer is not None and trainer.world_size > 1
                and isinstance(trainer.strategy, DDPStrategy))

    def on_train_start(self) -> None:
        if self._gan_on_ranks():
            self._broadcast_discriminator()
        on_device = all(skips_on_device(opt, self.trainer.precision_plugin, self.device) for opt in self._optimizers())
        self.nonfinite.start(on_device, self.device)

    def on_train_end(self) -> None:
        self.nonfinite.finish(self._optimizers())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite.flush()  # a non-finite step raises here, before the checkpoint is written
        checkpoint["train_generators"] = gather_rank_states(self.generator.get_state())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "train_generators" in checkpoint:
            self.generator.set_state(rank_state(checkpoint["train_generators"], self.global_rank))

    def _pixel_error(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """The per-pixel reconstruction error, ``rec_loss``'s L1 or L2."""
        return (rec - x).abs() if self.rec_loss == "l1" else (rec - x) ** 2

    def _reconstruction(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        per_sample = self._pixel_error(x, rec).mean(dim=(1, 2, 3))
        if self.perceptual is not None:
            per_sample = per_sample + self.perceptual_weight * self.perceptual(x, rec)
        return per_sample.mean()

    def _scale_equivariance_loss(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The reconstruction error of the 2x average-pooled latent ``z``, decoded, against the pooled image ``x``."""
        if z.shape[-1] % 2 or z.shape[-2] % 2:
            raise ValueError(f"vae_stage.scale_equivariance pools the latents 2x and needs even latent sizes, got "
                             f"{tuple(z.shape[-2:])}: set it to 0 or use an image size that is a multiple of "
                             f"{2 * self.vae.downsample_factor}")
        return self._pixel_error(F.avg_pool2d(x, 2), self.vae.decode(F.avg_pool2d(z, 2))).mean()

    def _gan_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.disc_start

    @property
    def optimizer_steps_per_batch(self) -> int:
        """How many optimizer steps the next batch makes (the autoencoder's, and the discriminator's once the GAN
        is on): ``Throughput`` counts a step's FLOPs up to the last of them."""
        return 2 if self._gan_active() else 1

    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        opts = self._optimizers()
        opt_ae, opt_d = opts[0], (opts[1] if len(opts) > 1 else None)
        step, gan = self.global_step, self._gan_active()  # before the generator's update counts the step
        posterior = self.vae.encode(x)
        z = posterior.sample(self.generator)
        rec = self.vae.decode(z)
        nll = self._reconstruction(x, rec)
        kl = posterior.kl().mean()
        loss = nll + self.kl_weight * kl
        if self.scale_equivariance > 0:
            se = self._scale_equivariance_loss(x, z)
            loss = loss + self.scale_equivariance * se
            self.step_log.add("train/se_loss", se, batch_size=x.shape[0])
        if gan:
            if min(x.shape[-2:]) < self.discriminator.min_size:
                raise ValueError(
                    f"the PatchGAN's {self.disc_layers} layers need images of at least {self.discriminator.min_size} "
                    f"px, got {tuple(x.shape[-2:])}: lower vae_stage.disc_layers or raise data.image_size")
            g_loss = -self.discriminator(rec).mean()
            # nll is a mean over each sample's C x H x W values, CompVis' a sum: its cap of 1e4 is 1e4 / (C H W) here
            w = adaptive_gan_weight(nll, g_loss, self.vae.decoder.conv_out.weight,
                                    max_weight=1e4 / x[0].numel()) * self.disc_weight
            loss = loss + w * g_loss
            self.step_log.add("train/g_loss", g_loss, batch_size=x.shape[0])
        if not self.nonfinite.loss_is_finite(loss, step):  # the host test (not with fused Adam)
            return
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.step_log.add("train/lr", host_scalar(opt_ae.param_groups[0]["lr"]), batch_size=x.shape[0])
        self._stepping = ("autoencoder", step, x.shape[0])  # on_before_optimizer_step: norm, clipping, skip test
        opt_ae.step()
        if gan:  # after the generator's update, as a fp16 gradient scaler's update expects
            d_loss = hinge_d_loss(self.discriminator(x), self.discriminator(rec.detach()))
            if not self.nonfinite.loss_is_finite(d_loss, step):
                return
            opt_d.zero_grad(set_to_none=True)  # drops what the generator's loss put there
            self.manual_backward(d_loss)
            if self._gan_on_ranks():
                self._average_discriminator()
            self._stepping = ("discriminator", step, x.shape[0])
            self._step_uncounted(opt_d)
            self.step_log.add("train/d_loss", d_loss, batch_size=x.shape[0])
        for sched in self._schedulers():
            sched.step()
        bs = x.shape[0]
        self.step_log.add("train/loss", loss, batch_size=bs, sync_dist=True)  # the mean over the ranks' batches
        self.step_log.add("train/rec_loss", nll, batch_size=bs)
        self.step_log.add("train/kl", kl, batch_size=bs)
        with torch.no_grad():
            mse = F.mse_loss(rec.clamp(-1, 1), x)
            self.step_log.add("train/psnr", 10 * torch.log10(4.0 / mse.clamp(min=1e-10)), batch_size=bs)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Inside each optimizer's step, after fp16's scaler has unscaled the gradients: their norm (logged for the
        autoencoder as ``train/grad_norm``), norm clipping at ``gradient_clip_val``, and the device-mode skip test."""
        which, step, batch_size = self._stepping
        inner = getattr(optimizer, "optimizer", optimizer)
        params = [p for g in inner.param_groups for p in g["params"] if p.grad is not None]
        norm = grad_norm(params)
        if norm is not None:
            if which == "autoencoder":
                self.step_log.add("train/grad_norm", norm, batch_size=batch_size)
            if self.gradient_clip_val:  # a non-finite norm's step is skipped (scaler or found_inf) whatever this does
                nn.utils.clip_grads_with_norm_(params, self.gradient_clip_val, norm)
        self.nonfinite.before_optimizer_step(optimizer, norm, step)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.step_log.flush(self)  # after the callbacks' hooks have added theirs

    def _broadcast_discriminator(self) -> None:
        """Start every rank from rank 0's discriminator (weights and statistics), which DDP, ignoring it, did not
        broadcast when it wrapped the module."""
        for t in [*self.discriminator.parameters(), *self.discriminator.buffers()]:
            torch.distributed.broadcast(t.data, src=0)

    def _average_discriminator(self) -> None:
        """Average the discriminator's gradients and BatchNorm running statistics over the ranks (one all-reduce per
        dtype), as DDP does for the autoencoder: every rank then takes the same update and holds the same running
        statistics (the mean of the ranks' own). Without it, the ranks' discriminators would drift apart."""
        d = self.discriminator
        tensors = [p.grad for p in d.parameters() if p.grad is not None]
        tensors += [b for b in d.buffers() if b.is_floating_point()]  # the running means and variances
        world = self.trainer.world_size
        for dtype in sorted({t.dtype for t in tensors}, key=str):  # the same order on every rank
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            torch.distributed.all_reduce(flat)
            flat /= world
            for t, v in zip(group, flat.split([t.numel() for t in group]), strict=True):
                t.copy_(v.view_as(t))

    def _step_uncounted(self, optimizer) -> None:
        """Step ``optimizer`` (through the strategy and precision plugin, as ``LightningOptimizer.step`` does) without
        counting a training step. In manual optimization Lightning counts each optimizer step as one (Lightning issue
        17958): the discriminator's would make a GAN batch two steps, and ``max_steps``, ``disc_start``, the learning
        rate schedule and step-based checkpoints would count half-batches."""
        self.trainer.strategy.optimizer_step(getattr(optimizer, "optimizer", optimizer), closure=lambda: None)

    def _optimizers(self) -> list:
        opts = self.optimizers()
        return opts if isinstance(opts, list) else [opts]

    def _schedulers(self) -> list:
        scheds = self.lr_schedulers()
        return [] if scheds is None else scheds if isinstance(scheds, list) else [scheds]

    def configure_optimizers(self):
        # fused: one kernel for the whole update, which can skip a non-finite step on the device (found_inf). Under
        # fp16 the gradient scaler owns that test: foreach there (one kernel per group of tensors, not a loop).
        kind = {"foreach": True} if str(self.trainer.precision).startswith("16") else {"fused": True}
        opts = [torch.optim.Adam(self.vae.parameters(), lr=self.lr, betas=self.betas, **kind)]
        if self.discriminator is not None:
            opts.append(torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=self.betas, **kind))
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, self.lr_factor) for o in opts]
        return opts, scheds

    @torch.no_grad()
    def fit_latent_normalization(self, images: torch.Tensor | list[torch.Tensor], per_channel: bool = False) -> str:
        """Fit the VAE's latent normalisation on posterior-sampled latents of ``images`` (one batch, or a list of
        batches that may differ in size, as aspect-ratio buckets give), so that diffusion trains on unit-variance
        latents, and return it in words for the log.

        ``per_channel=False``: one ``scale_factor``, 1 / std of all the latents' values (Rombach et al., 2022).
        ``per_channel=True``: each channel's mean and std (``latent_mean``, ``latent_std``; Karras et al., 2024, EDM2),
        so every channel reaches diffusion centred and at unit variance; a small VAE's channels can differ in mean and
        spread by more than their own std.
        """
        if not per_channel and self.vae.config.get("latent_std") is not None:
            raise ValueError("the VAE normalises per channel (latent_std); fit it with "
                             "vae_stage.latent_normalization=per_channel, or drop autoencoder.latent_std")
        generator = torch.Generator().manual_seed(self.seed)  # reproducible
        batches = [images] if isinstance(images, torch.Tensor) else images
        was_training = self.vae.training
        self.vae.eval()  # the latents diffusion will train on: no dropout (Lightning leaves the module training)
        try:
            with torch.no_grad():
                z = [self.vae.encode(x).sample(generator).float() for x in batches]
        finally:
            self.vae.train(was_training)
        if not all(torch.isfinite(b).all() for b in z):
            raise ValueError("the VAE encodes the normalisation fit's images to NaN or inf latents, so no latent "
                             "normalisation can be fitted: its weights or training diverged (check the vae stage's "
                             "loss; retrain with a lower vae_stage.lr or trainer.precision=32-true)")
        if per_channel:
            by_channel = torch.cat([b.transpose(0, 1).flatten(1) for b in z], 1)
            mean, std = by_channel.mean(1), by_channel.std(1)
            self.vae.set_latent_normalization(1.0, latent_mean=mean.tolist(), latent_std=std.tolist())
            return (f"latent mean {' '.join(f'{v:.3f}' for v in mean.tolist())}, "
                    f"std {' '.join(f'{v:.3f}' for v in std.tolist())}")
        config = self.vae.config
        if config.get("latent_mean") is not None:  # normalising subtracts each channel's mean first: the std after it
            z = [b - self.vae.latent_shift.to(b) for b in z]
        scale = float(1.0 / torch.cat([b.flatten() for b in z]).std())
        self.vae.set_latent_normalization(scale, config.get("shift_factor"), config.get("latent_mean"))
        return f"latent scale {scale:.4f}"
