"""Sample-quality metrics during training: FID (and KID) of images generated with the EMA weights, from fixed
captions and per-image seeds, against cached reference statistics.

Enable it with reference statistics (``python -m ldm.eval.ref_stats SHARDS --out stats.npz``) and local extractor
weights (never downloaded)::

    python train.py callbacks.ldm.evaluation.ref_stats=stats.npz eval.inception_weights=pt_inception.pth \\
        callbacks.ldm.evaluation.captions_file=captions.txt callbacks.ldm.evaluation.n=1000

Values are logged as ``eval/fid_n{n}`` (and ``eval/kid_n{n}``, ``eval/kid_std_n{n}``) in the row of the weights they
measure (after optimizer step N: logger step N - 1, where Lightning logs that step's train/loss and val/loss); the
sample count is in the name, because FID at small n is biased upward and values of different n do not
compare (k-diffusion#51). The protocol (library, extractor, resize, reference file, seeds) is logged once as
hyperparameters under ``eval_protocol``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from ldm.data.transforms import pil_to_uint8
from ldm.errors import ConfigError
from ldm.eval.generate import MAX_SEED, generate_images
from ldm.eval.generate import read_captions as read_caption_file
from ldm.eval.metrics import (
    DEFAULT_EXTRACTOR,
    FeatureExtractor,
    check_stats_weights,
    compute_metrics,
    features_to_stats,
    image_size_label,
    load_stats,
    resolve_weights,
    weights_digest,
)
from ldm.lightning.callbacks import steps_this_batch
from ldm.lightning.preemption import preempted


def read_captions(captions: Sequence[str] | None, captions_file: str | None) -> list[str]:
    """The fixed captions: the list, or the non-empty lines of ``captions_file`` (one caption a line)."""
    if captions_file:
        return read_caption_file(captions_file, option="captions_file=")
    return [str(c) for c in captions or []]


class Evaluation(L.Callback):
    """Every ``every_n_steps`` optimizer steps (0: only at the end) and at the end of training, generate ``n``
    images with the EMA weights and log their FID (``kid``: and KID) against ``ref_stats``.

    Image ``i`` (0 <= i < n) has caption ``captions[i % len(captions)]`` and the seed ``seed + i``
    (``ldm.eval.generate.generate_images``' seeding: one generator per image), so every evaluation of a run, and of
    any run with the same settings, samples the same noise for the same captions. Under DDP or FSDP the images are
    split over the ranks (rank r makes and measures images r, r + R, ...; under FSDP with the full weights) and
    their features are gathered; rank 0 computes the metrics (``ldm.eval.metrics.compute_metrics``) and logs them.
    The sampler settings are the module's sampling defaults unless ``num_inference_steps`` / ``guidance_scale`` /
    ``sampler`` are given; ``batch_size`` images go through the pipeline at a time, ``metric_batch_size`` through
    the extractor.

    With ``ref_stats`` null the callback does nothing (the default config's state). Missing or unreadable
    reference statistics or extractor weights, or no captions for a text-conditioned model, are a ConfigError when
    the callback is built, before training (``ldm.lightning.settings`` builds it at its config check too); the
    extractor network is loaded at setup and kept, so a corrupt weights file fails before the first step.
    """

    def __init__(
        self,
        ref_stats: str | None = None,
        every_n_steps: int = 0,
        n: int = 1000,
        captions: Sequence[str] | None = None,
        captions_file: str | None = None,
        seed: int = 0,
        batch_size: int = 16,
        extractor: str = DEFAULT_EXTRACTOR,
        weights_path: str | None = None,
        kid: bool = False,
        kid_subset_size: int = 1000,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        metric_batch_size: int = 64,
    ):
        self.enabled = ref_stats is not None and str(ref_stats) != ""
        self.ref_stats, self.every, self.n, self.seed = ref_stats, every_n_steps, n, seed
        self.batch_size, self.extractor, self.kid, self.kid_subset_size = batch_size, extractor, kid, kid_subset_size
        self.metric_batch_size = metric_batch_size
        self.call_kwargs = {k: v for k, v in (("num_inference_steps", num_inference_steps),
                                               ("guidance_scale", guidance_scale), ("sampler", sampler))
                            if v is not None}
        self.captions = read_captions(captions, captions_file) if self.enabled else []
        self.weights_path: str | None = weights_path
        self._done_step: int | None = None
        self._extractor: FeatureExtractor | None = None
        self._ref: dict[str, Any] | None = None  # the reference statistics, loaded by _check
        self._protocol_logged = False
        if self.enabled:
            self._check()

    def _check(self) -> None:
        for key, value, low in (("every_n_steps", self.every, 0), ("n", self.n, 2), ("seed", self.seed, 0),
                                ("batch_size", self.batch_size, 1), ("kid_subset_size", self.kid_subset_size, 2),
                                ("metric_batch_size", self.metric_batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
        stats = self._ref = load_stats(self.ref_stats)  # a ConfigError names a missing or unreadable file
        if stats.get("extractor") not in (None, self.extractor):
            raise ConfigError(f"ref_stats={self.ref_stats} holds {stats['extractor']} features, but the evaluation "
                              f"uses {self.extractor}: recompute it (python -m ldm.eval.ref_stats --feature-extractor "
                              f"{self.extractor}) or set eval.extractor={stats['extractor']}")
        if self.kid and stats["features"] is None:
            raise ConfigError(f"kid=true needs the reference features, and ref_stats={self.ref_stats} holds only "
                              "mu/sigma: recompute it with python -m ldm.eval.ref_stats")
        if self.seed > MAX_SEED - self.n:  # image i is drawn with seed + i
            raise ConfigError(f"seed must be at most 2**64 - n = {MAX_SEED - self.n} (image i draws its noise with "
                              f"seed + i, and torch takes seeds below 2**64), got {self.seed}")
        self.weights_path = resolve_weights(self.extractor, self.weights_path)  # the path, or the env variable's
        check_stats_weights(stats, {"weights": Path(self.weights_path).name,
                                    "weights_digest": weights_digest(self.weights_path)},
                            f"ref_stats={self.ref_stats}", "Recompute it with python -m ldm.eval.ref_stats and these "
                            "weights, or set eval.inception_weights to the file it was made with")

    def check_model(self, pl_module: L.LightningModule) -> None:
        """A text-conditioned model needs captions (an unconditional one samples with "")."""
        if getattr(pl_module, "text_encoder", None) is not None and not self.captions:
            raise ConfigError("the evaluation callback needs captions for a text-conditioned model: set "
                              "callbacks.ldm.evaluation.captions=[...] or captions_file=PATH (one caption a line)")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        self.check_model(pl_module)
        if self.n < trainer.world_size:
            raise ConfigError(f"the evaluation's n={self.n} is smaller than the {trainer.world_size} ranks that share "
                              "the images: raise n")
        # the extractor is loaded now, on every rank (each measures its own images): a corrupt weights file fails
        # before training. It moves to the training device at the first evaluation.
        self._extractor = FeatureExtractor(self.extractor, self.weights_path, "cpu")

    # ------------------------------------------------------------------ the evaluation

    def captions_of(self, indices: Sequence[int]) -> list[str]:
        """The caption of each image index (cycling through the list; "" without captions)."""
        return [self.captions[i % len(self.captions)] if self.captions else "" for i in indices]

    def _features(self, trainer: L.Trainer, pl_module) -> torch.Tensor:
        """Features [n, D] of the n images in index order: each rank generates and measures images rank, rank + R,
        ...; the features are gathered (not the images: a few KB each)."""
        rank, world = trainer.global_rank, trainer.world_size
        indices = list(range(rank, self.n, world))
        with torch.no_grad(), pl_module.sampling_pipeline() as pipe:
            images = generate_images(pipe, self.captions_of(indices), indices, seed=self.seed,
                                     batch_size=self.batch_size, **pl_module.guide_kwargs(self.call_kwargs))
        extractor = self._extractor
        if extractor is None or extractor.device != pl_module.device:
            extractor = self._extractor = FeatureExtractor(self.extractor, self.weights_path, pl_module.device)
        local = extractor.features(torch.stack([pil_to_uint8(im.convert("RGB")) for im in images]),
                                   self.metric_batch_size)
        if world == 1:
            return local
        share = -(-self.n // world)  # every rank sends the same shape: pad, then drop the padding
        padded = torch.zeros(share, local.shape[1], dtype=local.dtype)
        padded[: len(local)] = local
        padded = padded.to(pl_module.device)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(gathered, padded)
        out = torch.empty(self.n, local.shape[1], dtype=local.dtype)
        for r in range(world):
            mine = list(range(r, self.n, world))
            out[mine] = gathered[r][: len(mine)].cpu()
        return out

    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, float] | None:
        """Generate and extract on every rank, compute and log on rank 0; returns the logged values on rank 0."""
        self._done_step = trainer.global_step
        # Lightning logs the metrics of the batch that made optimizer step N (train/loss, and val/loss after it) at
        # step N - 1: the values of the same weights share a row
        step = max(trainer.global_step - 1, 0)
        features = self._features(trainer, pl_module)
        values: dict[str, float] | None = None
        if trainer.is_global_zero:
            assert self._extractor is not None
            # both sides as statistics in memory: the gathered features, and the reference loaded once at start-up
            # the images' size is the generating rank's: every rank samples at the pipeline's one size
            gen_meta = {**self._extractor.meta, "image_size": image_size_label(self._extractor.image_sizes)}
            gen = features_to_stats(features, {k: v for k, v in gen_meta.items() if v is not None})
            m = compute_metrics(gen, self._ref, extractor=self.extractor, fid=True, kid=self.kid,
                                kid_subset_size=self.kid_subset_size)
            values = {f"eval/fid_n{self.n}": m["fid"]}
            if self.kid:
                values[f"eval/kid_n{self.n}"] = m["kid_mean"]
                values[f"eval/kid_std_n{self.n}"] = m["kid_std"]
            model = "EMA" if getattr(pl_module, "ema", None) is not None else "raw (no EMA)"
            self._log(trainer, values, {**m.meta, **self._extractor.meta, "model_weights": model}, step)
        values = trainer.strategy.broadcast(values, src=0)
        for key, value in values.items():  # a checkpoint callback may monitor them (it runs after this one)
            trainer.callback_metrics[key] = torch.tensor(value)
        return values if trainer.is_global_zero else None

    def _log(self, trainer: L.Trainer, values: dict[str, float], meta: dict[str, Any], step: int) -> None:
        protocol = {**{k: str(v) for k, v in meta.items() if v is not None}, "n": self.n,
                    "ref_stats": str(self.ref_stats), "seeds": f"{self.seed} + image index",
                    "captions": len(self.captions), **{k: str(v) for k, v in self.call_kwargs.items()}}
        for logger in trainer.loggers:
            if not self._protocol_logged:
                logger.log_hyperparams({"eval_protocol": protocol})
            logger.log_metrics(values, step=step)
            logger.save()
        if not self._protocol_logged:
            rank_zero_info("evaluation protocol: " + ", ".join(f"{k} {v}" for k, v in protocol.items()))
        self._protocol_logged = True
        rank_zero_info(f"evaluation after step {trainer.global_step}: "
                       + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """At the batch that makes a multiple of ``every`` optimizer steps: under gradient accumulation the step count
        stays at N for the next window's batches, and a run resumed from step N's checkpoint starts on one of them
        (it evaluated step N again)."""
        step = trainer.global_step
        if (self.enabled and self.every and step > 0 and step % self.every == 0 and step != self._done_step
                and steps_this_batch(trainer)):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.enabled and not preempted(trainer) and trainer.global_step != self._done_step:
            self.evaluate(trainer, pl_module)


def check_evaluation(key: str, kwargs: dict[str, Any], text_conditioned: bool) -> None:
    """Build the callback of config entry ``key`` from its keyword arguments, which checks its files, and check
    that a text-conditioned model gets captions: a wrong or missing setting is a ConfigError naming the entry."""
    try:
        callback = Evaluation(**kwargs)
    except (TypeError, ConfigError) as err:
        raise ConfigError(f"{key}: {err}") from None
    if callback.enabled and text_conditioned and not callback.captions:
        raise ConfigError(f"{key}: a text-conditioned model needs captions to evaluate: set {key}.captions=[...] or "
                          f"{key}.captions_file=PATH (one caption a line)")
