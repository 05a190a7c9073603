"""LatentDiffusionModule: trains a UNet on the latents of a frozen VAE (or on pixels, or on cached latents)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from ldm.checkpoint import gather_rank_states, module_spec, rank_state
from ldm.diffusion import DiffusionLoss, NoiseSchedule
from ldm.lightning.ema import EMA
from ldm.lightning.optim import grad_norm, warmup_then
from ldm.lightning.sharding import full_params, global_sum, is_fsdp
from ldm.sampling import check_guidance_interval, make_scheduler, sample_loop
from ldm.text.conditioner import drop_captions


class LatentDiffusionModule(L.LightningModule):
    """Composes a denoiser, a text encoder (or none) and a first stage (a VAE, or None for pixel space).

    The first stage is frozen; latents are ``first_stage.encode_latents(image)`` (normalised there), or the
    ``latent`` entry of a batch from the latent cache. ``schedule`` holds the NoiseSchedule.from_name keywords;
    ``sampling`` the defaults a sampler should use with this model (saved with the checkpoint).

    ``guide_snapshot_step=N`` keeps a frozen copy of the UNet (its EMA weights) and of a trainable text encoder as
    they are after N optimizer steps (a float in (0, 1): that fraction of ``max_steps``): the weak model that
    autoguidance (``sampling.autoguidance_scale``) guides away from. It is saved in the checkpoint and costs one more
    copy of those weights in memory, no training time.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | None = None,
        first_stage: nn.Module | None = None,
        schedule: dict | None = None,
        prediction_type: str = "epsilon",
        loss_weighting: str = "uniform",
        snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        timestep_shift: float = 1.0,
        caption_dropout: float = 0.1,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        max_steps: int = 1,
        lr_decay_fraction: float = 0.2,
        ema_decay: float | None = 0.9999,
        ema_warmup: bool = True,
        nan_policy: str = "stop",
        max_nan_skips: int = 10,
        sampling: dict | None = None,
        guide_snapshot_step: int | float | None = None,
        text_encoder_kwargs: dict | None = None,
        run_config: dict | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.first_stage = first_stage
        if first_stage is not None:
            first_stage.requires_grad_(False).eval()
        self.schedule_kwargs = dict(schedule or {})
        self.schedule = NoiseSchedule.from_name(**self.schedule_kwargs)
        self.prediction_type = prediction_type
        self.loss_fn = DiffusionLoss(self.schedule, prediction_type, loss_weighting, snr_gamma, offset_noise,
                                     timestep_shift)
        self.caption_dropout = caption_dropout
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self.lr_factor = warmup_then(lr_schedule, warmup_steps, max_steps, lr_decay_fraction)
        self.ema = EMA(unet, ema_decay, ema_warmup) if ema_decay is not None else None
        if nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {nan_policy!r}")
        self.nan_policy = nan_policy
        self.max_nan_skips = max_nan_skips
        self.nan_skips = 0
        self.sampling = dict(sampling or {})
        check_guidance_interval(self.sampling.get("guidance_interval"))  # a typo fails now, not at the first grid
        self._init_guide(guide_snapshot_step, max_steps)
        self.text_encoder_kwargs = text_encoder_kwargs
        self.run_config = run_config
        # The training randomness (caption dropout, t, noise) comes from one generator whose state is saved in the
        # checkpoint, so a resumed run draws exactly what an uninterrupted one would. Offset by rank under DDP.
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def _init_guide(self, step: int | float | None, max_steps: int) -> None:
        """The frozen modules the guide snapshot is copied into (built now, so checkpoints load strictly)."""
        if isinstance(step, float):
            if 0 < step < 1:
                step = max(1, round(step * max_steps))
            elif step.is_integer():
                step = int(step)
            else:
                raise ValueError(f"ldm_stage.guide_snapshot_step={step} must be a step count (an integer) or a "
                                 "fraction of max_steps in (0, 1)")
        self.guide_snapshot_step = step
        self.guide_unet = self.guide_text_encoder = None
        scale = float(self.sampling.get("autoguidance_scale", 1.0))
        if scale < 1:
            raise ValueError(f"sampling.autoguidance_scale must be >= 1 (1 disables it), got {scale}")
        if step is None:
            if scale != 1.0:
                raise ValueError(f"sampling.autoguidance_scale={scale} needs a guide model: set "
                                 "ldm_stage.guide_snapshot_step (e.g. 100), or autoguidance_scale=1")
            return
        if not 0 < step <= max_steps:
            raise ValueError(f"ldm_stage.guide_snapshot_step={step} must lie in [1, max_steps={max_steps}]: the "
                             "snapshot is taken after that many optimizer steps")
        self.guide_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        text = self.text_encoder
        if text is not None and any(p.requires_grad for p in text.parameters()):  # a frozen one is shared
            self.guide_text_encoder = copy.deepcopy(text).requires_grad_(False).eval()
        self.register_buffer("guide_taken", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _take_guide_snapshot(self) -> None:
        """Copy the UNet (EMA weights when there is an EMA) and a trainable text encoder into the guide."""
        state = self.unet.state_dict()
        if self.ema is not None:
            state.update(self.ema.averaged_state_dict())
        self.guide_unet.load_state_dict(state)
        if self.guide_text_encoder is not None:
            self.guide_text_encoder.load_state_dict(self.text_encoder.state_dict())
        self.guide_taken.fill_(True)

    def has_guide(self) -> bool:
        """Whether the guide snapshot has been taken (autoguidance is possible)."""
        return self.guide_unet is not None and bool(self.guide_taken)

    def setup(self, stage: str) -> None:
        if self.guide_unet is not None and is_fsdp(self._trainer):
            raise ValueError("ldm_stage.guide_snapshot_step (autoguidance) is not supported under trainer=fsdp: the "
                             "snapshot would be copied into sharded weights. Use trainer=ddp, or set "
                             "ldm_stage.guide_snapshot_step=null sampling.autoguidance_scale=1")
        if self.trainer is not None and self.trainer.global_rank:
            self.generator.manual_seed(self.seed + 1000003 * self.trainer.global_rank)

    def describe(self) -> dict:
        """Everything needed to rebuild the parts and sample: saved in every checkpoint under ``"ldm"``."""
        return {
            "kind": "latent_diffusion",
            "unet": module_spec(self.unet),
            "text_encoder": None if self.text_encoder is None else module_spec(self.text_encoder,
                                                                               self.text_encoder_kwargs),
            "first_stage": None if self.first_stage is None else module_spec(self.first_stage),
            "schedule": self.schedule_kwargs,
            "prediction_type": self.prediction_type,
            "sampling": self.sampling,
            "ema": self.ema is not None,
            "guide": None if self.guide_unet is None else {
                "snapshot_step": self.guide_snapshot_step,
                "text_encoder": self.guide_text_encoder is not None,
            },
            "config": self.run_config,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ldm"] = self.describe()
        checkpoint["nan_skips"] = self.nan_skips
        checkpoint["train_generator"] = self.generator.get_state()
        checkpoint["train_generators"] = gather_rank_states(checkpoint["train_generator"])  # one per DDP rank

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nan_skips = checkpoint.get("nan_skips", 0)
        states = checkpoint.get("train_generators") or [checkpoint.get("train_generator")]
        if states[0] is not None:
            self.generator.set_state(rank_state(states, self.global_rank))

    # ------------------------------------------------------------------ training

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.first_stage, self.guide_unet, self.guide_text_encoder):
            if frozen is not None:
                frozen.eval()  # frozen: no dropout, no norm-statistics updates
        return self

    def latents_of(self, batch: dict) -> torch.Tensor:
        """Clean latents for a batch: from the cache, through the frozen first stage, or the pixels themselves."""
        if "latent" in batch:  # the cache holds raw posterior samples: normalise them as encode_latents does
            latent = batch["latent"]
            return latent if self.first_stage is None else self.first_stage.normalize_latents(latent)
        image = batch["image"]
        if self.first_stage is None:
            return image
        with torch.no_grad():  # the posterior sample draws from the module's generator: resume stays exact
            return self.first_stage.encode_latents(image, generator=self.generator)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor | None:
        if self.text_encoder is None:
            return None
        return self.text_encoder.encode(list(captions)).hidden

    def denoise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, y=None) -> torch.Tensor:
        return self.unet(x, t, context) if y is None else self.unet(x, t, context, y=y)

    def text_context(self, batch: dict) -> torch.Tensor | None:
        """Context after caption dropout: a frozen encoder's cached ``text_hidden`` (dropped rows get its null
        embedding, the encoding of ""), else the encoded captions. Both draw the same numbers from the generator."""
        if self.text_encoder is None:
            return None
        cached = batch.get("text_hidden")
        if cached is None or not getattr(self.text_encoder, "frozen", False):
            return self.encode_text(drop_captions(batch["caption"], self.caption_dropout, self.generator))
        dropped = drop_captions(["x"] * cached.shape[0], self.caption_dropout, self.generator)
        null = self.text_encoder.null_embedding().hidden
        drop = torch.tensor([c == "" for c in dropped], device=null.device)
        return torch.where(drop[:, None, None], null, cached.to(null.device, null.dtype))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        x0 = self.latents_of(batch)
        context = self.text_context(batch)
        y = batch.get("label") if getattr(self.unet, "num_classes", None) else None
        loss = self.loss_fn(lambda x, t, c: self.denoise(x, t, c, y), x0, context, generator=self.generator)
        if not torch.isfinite(loss):
            return self._on_nonfinite(loss)
        bs = x0.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def _on_nonfinite(self, loss: torch.Tensor) -> None:
        self.nan_skips += 1
        self.log("train/nan_skips", float(self.nan_skips))
        if self.nan_policy == "stop" or self.nan_skips > self.max_nan_skips:
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step} (skipped so far: {self.nan_skips - 1}). The last "
                "checkpoint is kept. Lower the learning rate, use bf16 rather than fp16, or set "
                "ldm_stage.nan_policy=skip (with ldm_stage.max_nan_skips) to skip such batches."
            )
        return None  # Lightning skips the optimizer step for a None loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # The gradient norm before clipping (Lightning clips after this hook).
        norm = grad_norm(p for g in optimizer.param_groups for p in g["params"])
        if is_fsdp(self._trainer):  # each rank holds a shard of the gradients (maybe none): sum the squares
            local = torch.zeros(2, device=self.device)  # (sum of squares, 1 if this rank has gradients)
            if norm is not None:
                local[0], local[1] = norm.square(), 1.0
            total = global_sum(self._trainer, local)
            norm = total[0].sqrt() if total[1] > 0 else None  # no rank has any (a skipped step): log nothing
        if norm is not None:
            self.log("train/grad_norm", norm)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except in two cases it refuses.

        - Under FSDP, norm clipping: the FSDP root clips by the norm over every rank's shards (``clip_grad_norm_`` on
          a shard alone would use a local norm).
        - A fused optimizer under mixed precision without a loss scaler (bf16-mixed): Lightning refuses any fused
          optimizer under AMP, because with fp16's scaler it would clip still-scaled gradients; without a scaler the
          gradients are already the true ones, so they are clipped here.
        """
        if not gradient_clip_val:
            return None
        if is_fsdp(self._trainer):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"under FSDP only norm clipping is supported, got {gradient_clip_algorithm!r}")
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return None
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and getattr(
                inner, "_step_supports_amp_scaling", False):
            params = [p for g in inner.param_groups for p in g["params"] if p.grad is not None]
            if gradient_clip_algorithm in (None, "norm"):
                nn.utils.clip_grad_norm_(params, gradient_clip_val)
            else:
                nn.utils.clip_grad_value_(params, gradient_clip_val)
            return None
        return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA update: once per optimizer step (not per accumulated batch), and before
        the callbacks' on_train_batch_end, so a checkpoint written there holds this step's average (exact resume)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            with full_params(self._trainer):  # FSDP: the whole UNet on every rank (a no-op otherwise)
                self.ema.update(self.unet)
        # global_step counts this step only after this hook returns; checkpoints are written later (exact resume)
        if self.guide_unet is not None and not self.guide_taken and self.global_step + 1 >= self.guide_snapshot_step:
            self._take_guide_snapshot()

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        if self.text_encoder is not None:
            params += [p for p in self.text_encoder.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        latent_shape: tuple[int, int, int] | None = None,
        use_ema: bool = True,
        labels: torch.Tensor | None = None,
        autoguidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1], [B, C, H, W], for ``prompts`` (EMA weights by default).

        ``autoguidance_scale`` None takes ``sampling``'s; before the guide snapshot is taken it is 1 (no guide yet).

        Under FSDP every rank must call it (the full weights are gathered for the duration).
        """
        with full_params(self._trainer):  # FSDP: the whole model on every rank (a no-op otherwise)
            s = self.sampling
            guidance_scale = s.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
            steps = num_inference_steps or s.get("num_inference_steps", 25)
            scheduler = make_scheduler(sampler or s.get("sampler", "dpm_solver++"), self.schedule_kwargs,
                                       self.prediction_type)
            scheduler.set_timesteps(steps)
            shape = latent_shape or tuple(s["latent_shape"])
            n = len(prompts)
            context = uncond = None
            if self.text_encoder is not None:
                context = self.encode_text(prompts)
                neg = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
                uncond = self.encode_text(neg)
            auto = float(s.get("autoguidance_scale", 1.0) if autoguidance_scale is None else autoguidance_scale)
            guide = guide_context = None
            if auto != 1.0 and self.has_guide():
                guide = self.guide_unet
                guide_context = context if self.guide_text_encoder is None else self.guide_text_encoder.encode(
                    list(prompts)).hidden
            elif auto != 1.0 and self.guide_unet is not None:
                auto = 1.0  # grids before the snapshot step: there is no guide yet
            device = next(self.unet.parameters()).device
            noise_gen_device = generator.device if generator is not None else device
            x = torch.randn((n, *shape), generator=generator, device=noise_gen_device).to(device)
            was_training = self.unet.training
            self.unet.eval()
            try:
                weights = self.ema.swapped_in(self.unet) if use_ema and self.ema is not None else nullcontext()
                with weights:
                    z = sample_loop(self.denoise, scheduler, x, context, uncond, guidance_scale, generator=generator,
                                    y=labels, guidance_interval=s.get("guidance_interval"), guide=guide,
                                    guide_context=guide_context, autoguidance_scale=auto)
            finally:
                self.unet.train(was_training)
            if self.first_stage is None:
                return z.clamp(-1, 1)
            return self.first_stage.decode_latents(z.to(next(self.first_stage.parameters()).dtype)).float()
