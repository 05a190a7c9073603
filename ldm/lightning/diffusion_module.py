"""LatentDiffusionModule: trains a UNet on the latents of a frozen VAE (or on pixels, or on cached latents)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from ldm.checkpoint import describe_ldm, gather_rank_states, lora_header, rank_state
from ldm.data.masks import MaskSettings, binarize, latent_mask, masked_image, random_masks
from ldm.diffusion import DiffusionLoss, NoiseSchedule, SamplingDefaults
from ldm.diffusion.flow import FlowMatchingLoss
from ldm.diffusion.sampling import default_sampler
from ldm.diffusion.validation import (
    DEFAULT_NUM_TIMESTEPS,
    objective_timesteps,
    validation_losses,
    validation_noise,
    validation_timesteps,
)
from ldm.lightning.host_reads import host_scalar
from ldm.lightning.nonfinite import NaNPolicy, NonFiniteSteps, skips_on_device
from ldm.lightning.optim import LRSchedule, grad_norm
from ldm.lightning.sharding import full_params, is_fsdp, refuse_nested_units, shard_layout, shard_sum
from ldm.lightning.step_log import StepLog
from ldm.lora import has_lora
from ldm.nn.ema import EMA, EMASettings
from ldm.pipeline import LatentDiffusionPipeline
from ldm.text.conditioner import drop_captions


@dataclass(frozen=True)
class ValidationSettings:
    """The deterministic validation loss (``ldm.diffusion.validation``): ``num_timesteps`` fixed timesteps, noise
    seeded ``seed + sample index``."""

    num_timesteps: int = DEFAULT_NUM_TIMESTEPS
    seed: int = 0


def recorded_objective(loss: DiffusionLoss | FlowMatchingLoss) -> tuple[dict[str, Any], str]:
    """What a checkpoint records of the training objective ``loss``: the schedule's ``from_name`` keywords (a flow
    model: its ``FlowMatchingLoss.spec``, no noise schedule) and the prediction type."""
    if isinstance(loss, FlowMatchingLoss):
        return loss.spec, loss.prediction_type
    if loss.schedule.spec is None:
        raise ValueError("the loss's noise schedule must be built with NoiseSchedule.from_name(...), so that "
                         "checkpoints record it for the samplers")
    return dict(loss.schedule.spec), loss.prediction_type


class LatentDiffusionModule(L.LightningModule):
    """Composes a denoiser, a text encoder (or none) and a first stage (a VAE, or None for pixel space).

    The first stage is frozen; latents are ``first_stage.encode_latents(image)`` (normalised there), or the
    ``latent`` entry of a batch from the latent cache. ``loss`` is the objective (its schedule built with
    ``NoiseSchedule.from_name``, so checkpoints record it); ``sampling`` the defaults a sampler uses with this model
    (saved with the checkpoint).

    ``guide_snapshot_step=N`` keeps a frozen copy of the UNet (its EMA weights) and of a trainable text encoder as
    they are after N optimizer steps (a float in (0, 1): that fraction of ``lr_schedule.max_steps``): the weak model
    that autoguidance (``sampling.autoguidance_scale``) guides away from. It is saved in the checkpoint and costs one
    more copy of those weights in memory, no training time.

    Given validation data (``data.val_shards``), ``validation_step`` measures the deterministic validation loss of
    ``ldm.diffusion.validation`` (``validation``: how many fixed timesteps, the noise seed) with the EMA weights when
    there is an EMA (the model that is sampled and published), logging ``val/loss_t<t>`` and their mean ``val/loss``.
    """

    progress_bar_keys = ("train/loss",)  # what StepProgressBar shows, read at its refresh

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | None = None,
        first_stage: nn.Module | None = None,
        loss: DiffusionLoss | FlowMatchingLoss | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_schedule: LRSchedule = LRSchedule(),
        ema: EMASettings | None = EMASettings(),
        sampling: SamplingDefaults | None = None,
        caption_dropout: float = 0.1,
        nan: NaNPolicy | None = None,
        guide_snapshot_step: int | float | None = None,
        text_encoder_kwargs: dict | None = None,
        run_config: dict | None = None,
        seed: int = 0,
        validation: ValidationSettings = ValidationSettings(),
        lora_base: dict | None = None,
        inpainting: MaskSettings | None = None,
    ):
        super().__init__()
        self.step_log = StepLog()  # the step's training values, logged on the steps Lightning writes
        # A LoRA run (adapters added to the parts beforehand): ``{"path", "sha256"}`` of the base file; checkpoints
        # then hold the adapters only, and a resumed run loads them into the base it rebuilt (not strictly).
        self.lora_base = lora_base
        if lora_base is not None:
            self.strict_loading = False
        self.unet = unet
        self.text_encoder = text_encoder
        self.first_stage = first_stage
        # An inpainting UNet (latents, mask, masked-image latents: SD-inpainting's 9 channels) trains on these masks
        self.mask_settings = inpainting or MaskSettings()
        if first_stage is not None:
            first_stage.requires_grad_(False).eval()
        self.loss_fn = loss or DiffusionLoss(NoiseSchedule.from_name())
        self.schedule_kwargs, self.prediction_type = recorded_objective(self.loss_fn)
        self.caption_dropout = caption_dropout
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self.lr_factor = lr_schedule.factor()
        self.ema = EMA(unet, ema.decay, ema.warmup) if ema is not None else None
        self.nonfinite = NonFiniteSteps(nan or NaNPolicy())
        self._clip_norm: torch.Tensor | None = None  # this step's gradient norm, from on_before_optimizer_step
        self._drop_update = False  # several ranks, host mode: this window's loss was not finite (on_after_backward)
        # None: the defaults, with the sampler of the model's kind (flow_euler for a flow-matching loss)
        self.sampling = sampling or SamplingDefaults(
            sampler=default_sampler(self.schedule_kwargs, self.prediction_type))
        self._init_guide(guide_snapshot_step, lr_schedule.max_steps)
        self.text_encoder_kwargs = text_encoder_kwargs
        self.run_config = run_config
        # The training randomness (caption dropout, t, noise) comes from one generator whose state is saved in the
        # checkpoint, so a resumed run draws exactly what an uninterrupted one would. Offset by rank under DDP.
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.validation = validation
        self.val_timesteps = validation_timesteps(objective_timesteps(self.loss_fn), validation.num_timesteps)
        self._val_totals: torch.Tensor | None = None  # per-timestep sums of the losses, and the sample count
        self._val_weights: ExitStack | None = None  # the EMA weights swapped in for a validation

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
        scale = self.sampling.autoguidance_scale
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
        if is_fsdp(self._trainer) and any(m is not None and has_lora(m) for m in (self.unet, self.text_encoder)):
            raise ValueError("LoRA (ldm_stage.lora.rank) is not supported under trainer=fsdp: the adapters and the "
                             "frozen base would share FSDP's flat parameters (gradients computed and reduced for the "
                             "whole base) and the adapters are exported from this rank's shard. Use trainer=ddp: a "
                             "LoRA run's optimizer state and gradients are the adapters' only")
        if self.trainer is not None and self.trainer.global_rank:
            self.generator.manual_seed(self.seed + 1000003 * self.trainer.global_rank)

    def on_fit_start(self) -> None:
        """Under FSDP (wrapped by now, not yet restored from a checkpoint): refuse nested FSDP units, and keep only
        this rank's shard's part of the EMA: SD 1.5's full float32 average would be 3.4 GB on every rank and need the
        whole UNet gathered at every step. Checkpoints still hold the full averages (assembled when saved)."""
        if not is_fsdp(self._trainer):
            return
        root = self._trainer.strategy.model
        refuse_nested_units(root)
        layout = shard_layout(root, "unet.") if self.ema is not None else None
        if layout is not None:
            self.ema.keep_shards(layout)

    def describe(self) -> dict:
        """The checkpoint header (``ldm.checkpoint.describe_ldm``): everything needed to rebuild the parts and
        sample."""
        guide = None if self.guide_unet is None else {"snapshot_step": self.guide_snapshot_step,
                                                     "text_encoder": self.guide_text_encoder is not None}
        return describe_ldm(unet=self.unet, text_encoder=self.text_encoder, first_stage=self.first_stage,
                            schedule=self.schedule_kwargs, prediction_type=self.prediction_type,
                            sampling=self.sampling, ema=self.ema is not None, guide=guide,
                            text_encoder_kwargs=self.text_encoder_kwargs, config=self.run_config,
                            lora=None if self.lora_base is None else lora_header(
                                self.lora_base["path"], self.lora_base["sha256"],
                                {n: m for n, m in (("unet", self.unet), ("text_encoder", self.text_encoder))
                                 if m is not None and has_lora(m)}))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ldm"] = self.describe()
        if self.lora_base is not None:  # the adapters only: the base is the file the header names
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if ".lora_A." in k or ".lora_B." in k}
        self.nonfinite.flush()  # the exact count (a device read; a checkpoint waits for the GPU anyway)
        checkpoint["nan_skips"] = self.nonfinite.skipped
        checkpoint["train_generator"] = self.generator.get_state()
        checkpoint["train_generators"] = gather_rank_states(checkpoint["train_generator"])  # one per DDP rank
        # dropout (the UNet's, LoRA's) draws from torch's global generators: kept too, so a resume stays exact
        checkpoint["torch_rng_states"] = gather_rank_states(torch.get_rng_state())
        if self.device.type == "cuda":
            checkpoint["cuda_rng_states"] = gather_rank_states(torch.cuda.get_rng_state(self.device))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite.skipped = checkpoint.get("nan_skips", 0)
        states = checkpoint.get("train_generators") or [checkpoint.get("train_generator")]
        if states[0] is not None:
            self.generator.set_state(rank_state(states, self.global_rank))
        if checkpoint.get("torch_rng_states"):
            torch.set_rng_state(rank_state(checkpoint["torch_rng_states"], self.global_rank))
        if checkpoint.get("cuda_rng_states") and self.device.type == "cuda":
            torch.cuda.set_rng_state(rank_state(checkpoint["cuda_rng_states"], self.global_rank), self.device)

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

    def denoise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, y=None,
                concat: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {k: v for k, v in (("y", y), ("concat", concat)) if v is not None}
        return self.unet(x, t, context, **kwargs)

    @property
    def is_inpainting(self) -> bool:
        """Whether the UNet takes a mask and masked-image latents after the noisy latents (2 x latent + 1 inputs)."""
        latent = self.first_stage.embed_dim if self.first_stage is not None else getattr(self.unet, "out_channels", 0)
        return bool(latent) and getattr(self.unet, "in_channels", latent) == 2 * latent + 1

    def inpaint_condition(self, batch: dict, x0: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor | None:
        """An inpainting UNet's extra inputs (None for other models): the mask at latent size (nearest) and the
        latents of the image with the masked region zeroed, as SD-inpainting trains. The mask is the batch's
        ``mask`` (the shards' own, for the samples ``mask_given`` names when only some have one) or drawn from
        ``generator`` (``MaskSettings``); without one (validation) every pixel is masked, the text-to-image case, so
        the loss stays deterministic."""
        if not self.is_inpainting:
            return None
        image = batch.get("image")
        if image is None:
            raise ValueError("an inpainting UNet trains on images (it encodes the masked image), not on cached "
                             "latents: set ldm_stage.cache_latents=false")
        n, _, h, w = image.shape
        given = batch.get("mask_given")  # some samples carry their own mask: the others get a drawn (or full) one
        if "mask" in batch:
            mask = batch["mask"]
            mask = binarize(mask.float() / 255 if mask.dtype == torch.uint8 else mask.float())
            if given is not None and not bool(given.all()):
                drawn = random_masks(n, h, w, self.mask_settings, generator) if generator is not None else \
                    torch.ones(n, 1, h, w)
                mask = torch.where(given.to(mask.device)[:, None, None, None], mask, drawn.to(mask.device))
        elif generator is not None:
            mask = random_masks(n, h, w, self.mask_settings, generator)
        else:
            mask = torch.ones(n, 1, h, w)
        mask = mask.to(image.device, image.dtype, non_blocking=True)  # drawn on the host: no wait for the GPU
        with torch.no_grad():
            masked = masked_image(image, mask)
            if self.first_stage is not None:
                masked = (self.first_stage.encode_latents(masked, generator=generator) if generator is not None
                          else self.first_stage.normalize_latents(self.first_stage.encode(masked).mode()))
        return torch.cat([latent_mask(mask, x0.shape[-2:]).to(x0.dtype), masked.to(x0.dtype)], dim=1)

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
        drop = torch.tensor([c == "" for c in dropped]).to(null.device, non_blocking=True)
        return torch.where(drop[:, None, None], null, cached.to(null.device, null.dtype))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        x0 = self.latents_of(batch)
        context = self.text_context(batch)
        y = batch.get("label") if getattr(self.unet, "num_classes", None) else None
        concat = self.inpaint_condition(batch, x0, self.generator)
        loss = self.loss_fn(lambda x, t, c: self.denoise(x, t, c, y, concat), x0, context, generator=self.generator)
        if not self.nonfinite.loss_is_finite(loss, self.global_step):
            if self.trainer.world_size == 1:
                return None  # Lightning skips the backward and the optimizer's update for a None loss
            self._drop_update = True  # Lightning refuses None on several ranks: on_after_backward drops the update
            return loss
        bs = x0.shape[0]
        # the mean over the ranks' batches; on the bar (this rank's) at its refresh only: progress_bar_keys
        self.step_log.add("train/loss", loss, batch_size=bs, sync_dist=True)
        self.step_log.add("train/lr", host_scalar(self.trainer.optimizers[0].param_groups[0]["lr"]), batch_size=bs)
        self.step_log.add("train/nan_skips", host_scalar(self.nonfinite.skipped), batch_size=bs)
        return loss

    @property
    def nan_skips(self) -> int:
        """The training steps skipped for a non-finite loss or gradient (``NaNPolicy``), as known on the host."""
        return self.nonfinite.skipped

    def on_train_start(self) -> None:
        self.nonfinite.start(
            skips_on_device(self.trainer.optimizers[0], self.trainer.precision_plugin, self.device), self.device)

    def on_train_end(self) -> None:
        self.nonfinite.finish(self.trainer.optimizers)

    def on_after_backward(self) -> None:
        """A step whose loss a rank found non-finite, with several ranks in the host mode: every rank ran its backward
        (each all-reduce needs them all) and its update is dropped here, for the whole accumulation window. Without
        a gradient scaler the gradients are removed, and the optimizer skips parameters without one (weights and
        state untouched); fp16's scaler gets non-finite gradients, and skips the step as for an overflow."""
        if not self._drop_update:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        for p in self.parameters():
            if p.grad is not None:
                if scaler is None:
                    p.grad = None
                else:
                    p.grad.fill_(float("nan"))

    def on_before_optimizer_step(self, optimizer) -> None:
        # The gradient norm before clipping (Lightning clips after this hook).
        norm = grad_norm(p for g in optimizer.param_groups for p in g["params"])
        if is_fsdp(self._trainer):  # each rank holds a shard of the gradients (maybe none): sum the squares
            local = torch.zeros(2, device=self.device)  # (sum of squares, 1 if this rank has gradients)
            if norm is not None:
                local[0], local[1] = norm.square(), 1.0
            total = shard_sum(self._trainer, local)
            if self.nonfinite.on_device:  # every rank has gradients (no step skips its backward): no host read
                norm = total[0].sqrt()
            else:
                norm = total[0].sqrt() if total[1] > 0 else None  # no rank has any (a skipped step): log nothing
        else:  # clipping reuses it: the same gradients, one pass over them instead of two
            self._clip_norm = norm
        if norm is not None:
            self.step_log.add("train/grad_norm", norm)
        self.nonfinite.before_optimizer_step(optimizer, norm, self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Norm clipping by the gradient norm that ``on_before_optimizer_step`` computed for the log
        (``clip_grad_norm_`` would compute it again); under fp16's scaler, and for value clipping, Lightning's
        clipping, except in two cases it refuses.

        - Under FSDP, norm clipping: the FSDP root clips by the norm over every rank's shards (``clip_grad_norm_`` on
          a shard alone would use a local norm).
        - A fused optimizer under mixed precision without a loss scaler (bf16-mixed): Lightning refuses any fused
          optimizer under AMP, because with fp16's scaler it would clip still-scaled gradients; without a scaler the
          gradients are already the true ones, so they are clipped here.
        """
        norm, self._clip_norm = self._clip_norm, None
        if not gradient_clip_val:
            return None
        if is_fsdp(self._trainer):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"under FSDP only norm clipping is supported, got {gradient_clip_algorithm!r}")
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return None
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        params = [p for g in inner.param_groups for p in g["params"] if p.grad is not None]
        plugin = self.trainer.precision_plugin
        if not isinstance(plugin, MixedPrecision) or plugin.scaler is None:  # fp16's scaler: Lightning's clipping
            if gradient_clip_algorithm in (None, "norm"):
                # clip_grad_norm_ is this with the norm computed again; on_before_optimizer_step has it already
                norm = norm if norm is not None else grad_norm(params)
                if norm is not None:  # None: no parameter has a gradient
                    nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
                return None
            if isinstance(plugin, MixedPrecision) and getattr(inner, "_step_supports_amp_scaling", False):
                nn.utils.clip_grad_value_(params, gradient_clip_val)
                return None
        return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA update: once per optimizer step (not per accumulated batch), and before
        the callbacks' on_train_batch_end, so a checkpoint written there holds this step's average (exact resume)."""
        super().optimizer_step(*args, **kwargs)
        self._drop_update = False
        if self.ema is not None:  # FSDP: each rank's part of the average from its shard (on_fit_start)
            with nullcontext() if self.ema.sharded else full_params(self._trainer):
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

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # At the last step, ask Lightning to stop: its loop then validates once more (if validation is on), so the
        # final weights are measured even when max_steps is not a multiple of the validation period.
        trainer = self.trainer
        if trainer.max_steps > 0 and self.global_step >= trainer.max_steps and trainer.limit_val_batches != 0:
            trainer.should_stop = True
        self.step_log.flush(self)  # last: the callbacks' hooks have added theirs, and should_stop is final

    # ------------------------------------------------------------------ validation

    def weights_for_eval(self) -> AbstractContextManager:
        """A context in which the UNet holds the EMA weights (if there is an EMA), restored on exit."""
        return self.ema.swapped_in(self.unet) if self.ema is not None else nullcontext()

    def validation_latents(self, batch: dict) -> torch.Tensor:
        """Clean latents without randomness: the cache's posterior mean, the VAE posterior's mode, or pixels."""
        if "latent" in batch:
            latent = batch["latent"]
            return latent if self.first_stage is None else self.first_stage.normalize_latents(latent)
        image = batch["image"]
        if self.first_stage is None:
            return image
        return self.first_stage.normalize_latents(self.first_stage.encode(image).mode())

    def validation_context(self, batch: dict) -> torch.Tensor | None:
        """The text context of the captions as given (no dropout)."""
        if self.text_encoder is None:
            return None
        cached = batch.get("text_hidden")
        if cached is not None and getattr(self.text_encoder, "frozen", False):
            null = self.text_encoder.null_embedding().hidden
            return cached.to(null.device, null.dtype)
        return self.encode_text(batch["caption"])

    def on_validation_epoch_start(self) -> None:
        """Swap the EMA weights in for the whole validation. Under FSDP the swap happens in the full parameters
        with write-back, outside the forward (where the parameters are views), so FSDP's forward gathers them."""
        self._val_totals = torch.zeros(len(self.val_timesteps) + 1, dtype=torch.float64, device=self.device)
        self._val_weights = ExitStack()
        with full_params(self._trainer, writeback=True):
            self._val_weights.enter_context(self.weights_for_eval())

    def _restore_training_weights(self) -> None:
        if self._val_weights is not None:
            with full_params(self._trainer, writeback=True):
                self._val_weights.close()
            self._val_weights = None

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate the per-timestep validation losses of the batch's real samples (padding has weight 0)."""
        x0 = self.validation_latents(batch)
        context = self.validation_context(batch)
        y = batch.get("label") if getattr(self.unet, "num_classes", None) else None
        index = batch["index"].clamp(min=0).cpu()  # -1 marks a rank's padding sample
        noise = validation_noise(x0.shape[1:], index, len(self.val_timesteps), self.validation.seed)
        concat = self.inpaint_condition(batch, x0)
        losses = validation_losses(self.loss_fn, lambda x, t, c: self.denoise(x, t, c, y, concat), x0, context,
                                   self.val_timesteps, noise)
        weight = batch["weight"].to(losses.device, torch.float64)
        assert self._val_totals is not None
        self._val_totals[:-1] += (losses.double() * weight).sum(dim=1)
        self._val_totals[-1] += weight.sum()

    def on_validation_epoch_end(self) -> None:
        """Restore the training weights; sum over ranks, then log ``val/loss_t<t>`` per timestep and ``val/loss``,
        their mean."""
        self._restore_training_weights()
        if self._val_totals is None:
            return
        totals = self.trainer.strategy.reduce(self._val_totals, reduce_op="sum")
        self._val_totals = None
        if totals[-1] <= 0:
            return
        means = (totals[:-1] / totals[-1]).float()
        for t, value in zip(self.val_timesteps, means, strict=True):
            self.log(f"val/loss_t{t}", value, sync_dist=True)  # equal on every rank: the mean changes nothing
        self.log("val/loss", means.mean(), prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------------ sampling

    def pipeline(self) -> LatentDiffusionPipeline:
        """The public pipeline around this module's parts (the training weights; see ``generate`` for the EMA)."""
        guide = self.has_guide()
        return LatentDiffusionPipeline(self.unet, self.text_encoder, self.first_stage, self.schedule_kwargs,
                                       self.prediction_type, self.sampling, self.guide_unet if guide else None,
                                       self.guide_text_encoder if guide else None)

    def guide_kwargs(self, kwargs: dict) -> dict:
        """``kwargs`` of a pipeline call, with autoguidance off before the guide snapshot is taken (no guide yet)."""
        if kwargs.get("autoguidance_scale") is None and self.guide_unet is not None and not self.has_guide():
            return {**kwargs, "autoguidance_scale": 1.0}
        return kwargs

    @contextmanager
    def sampling_pipeline(self, use_ema: bool = True) -> Iterator[LatentDiffusionPipeline]:
        """The pipeline around this module's parts with the full weights (FSDP) and the EMA weights (``use_ema``)
        in the UNet for the duration. Under FSDP every rank must enter it (the weights are gathered)."""
        with full_params(self._trainer):  # FSDP: the whole model on every rank (a no-op otherwise)
            with self.weights_for_eval() if use_ema else nullcontext():
                yield self.pipeline()

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], use_ema: bool = True, **kwargs) -> torch.Tensor:
        """Images in [-1, 1], [B, C, H, W], for ``prompts`` through :class:`LatentDiffusionPipeline` (EMA weights
        by default); ``kwargs`` go to the pipeline's call. Before the guide snapshot is taken, autoguidance is off.

        Under FSDP every rank must call it (the full weights are gathered for the duration).
        """
        with self.sampling_pipeline(use_ema) as pipe:
            return pipe(list(prompts), output_type="tensor", **self.guide_kwargs(kwargs))
