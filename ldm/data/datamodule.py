"""The shard reader as a resumable loader, and the Lightning DataModule around it.

``ShardLoader`` is an iterable of collated batches whose order is a function of (seed, epoch, rank, worker) (see
:class:`ldm.data.shards.ReadPlan`). Its position is ``(epoch, batches consumed)``; restoring that position replays
each worker's stream and skips the raw samples already used (no decoding), so a resumed run yields exactly the
batches an uninterrupted run would have. Every rank gets the same number of batches per epoch (the minimum over
ranks, computed from the shard counts in index.json), set on the loader, not per worker.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.buckets import BucketSpec, shard_buckets
from ldm.data.shards import ReadPlan, ShardError, _rng, iter_shard, resolve_shards
from ldm.data.transforms import ImageTransform, SampleDecoder, check_labels, collate, uint8_to_float
from ldm.data.urls import shard_digest
from ldm.errors import ConfigError

POS_KEY = "__pos__"  # (split, epoch, batch index) attached to each batch; the DataModule pops it


class _EpochStream(IterableDataset):
    """One epoch of one rank, from batch ``start`` on; inside DataLoader worker ``d`` it plays logical worker
    ``(order[start] + d) % W`` so the DataLoader's round robin (which always begins at worker 0) continues the
    uninterrupted order."""

    def __init__(self, plan: ReadPlan, rank: int, epoch: int, start: int, decoder: SampleDecoder,
                 bucket_sizes: tuple[tuple[int, int], ...] | None = None) -> None:
        self.plan, self.rank, self.epoch, self.start, self.decoder = plan, rank, epoch, start, decoder
        self.bucket_sizes = bucket_sizes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != plan.num_workers:
            raise RuntimeError(f"plan has {plan.num_workers} workers but the DataLoader runs {info.num_workers}")
        order = plan.order(self.rank)
        if self.start >= len(order):
            return
        worker = (order[self.start] + physical) % plan.num_workers
        done, todo = order[: self.start].count(worker), order[self.start :].count(worker)
        if todo == 0:
            return
        groups = plan.groups(plan.worker_samples(self.rank, worker, self.epoch))
        # the batches consumed before the resume: grouped again from the raw samples, not decoded
        previous: list[dict[str, Any]] | None = None  # the last group: what stands in for a batch that decodes empty
        skipped = 0
        for group in itertools.islice(groups, done):
            previous, skipped = group, skipped + 1
        if skipped < done:
            raise RuntimeError(f"worker {worker} of rank {self.rank} ran out of samples while skipping to batch "
                               f"{self.start} of epoch {self.epoch}: the shards changed since the position was saved")
        for group in itertools.islice(groups, todo):
            yield self._batch(group, previous)
            previous = group

    def _decode(self, raws: list[dict[str, Any]], size: tuple[int, int] | None,
                errors: list[str]) -> list[dict[str, Any]]:
        """The samples of ``raws`` that decode (at ``size``); each failure is warned about and added to ``errors``.
        Samples lost to a damaged shard arrive as placeholders (``__error__``) the reader has already warned about."""
        samples = []
        for raw in raws:
            if "__error__" in raw:
                errors.append(raw["__error__"])
                continue
            rng = _rng("sample", self.plan.seed, self.epoch, raw["__shard__"], raw["__key__"])
            try:
                samples.append(self.decoder(raw, rng, size))
            except Exception as err:
                errors.append(f"sample {raw['__shard__']}/{raw['__key__']}: {type(err).__name__}: {err}")
                warnings.warn(f"skipping sample {raw['__shard__']}/{raw['__key__']}: {err}", stacklevel=3)
        return samples

    def _batch(self, raws: list[dict[str, Any]], previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Decode and collate; a bad sample shrinks its batch (the position bookkeeping stays exact). A batch of
        which nothing decodes (one damaged image alone in its bucket, or a shard's lost samples) becomes one sample
        of this worker's previous batch, at this batch's size: every rank still steps, and a resumed run, which
        groups the skipped batches again, picks the same one."""
        errors: list[str] = []
        size = None if self.bucket_sizes is None else self.bucket_sizes[raws[0]["__bucket__"]]
        samples = self._decode(raws, size, errors)
        if samples:
            return collate(samples)
        where = f"shard {raws[0]['__shard__']}, first key {raws[0]['__key__']}, epoch {self.epoch}"
        stand_in = self._decode(previous, size, []) if previous is not None else []
        if not stand_in:
            raise ShardError(f"every sample of a batch ({where}) was lost or failed to decode, and no earlier batch "
                             f"of this worker can stand in for it; first error: {errors[0]}. Fix: delete that shard "
                             "and rerun the command that wrote it (make_shards and cache_latents write missing "
                             "shards again), or leave it out")
        warnings.warn(f"every sample of a batch ({where}) was lost or failed to decode ({errors[0]}): training on one "
                      f"sample of the batch before it instead, key {stand_in[0].get('key')}", stacklevel=2)
        return collate(stand_in[:1])


class ShardLoader:
    """Iterable of batches (dicts: image or latent, caption, label where present, key) with an exact position.

    Each ``iter()`` plays the next epoch (or the restored position). ``len()`` is the batches per epoch per rank.
    Workers are started per epoch (no persistent workers), each reseeded from (seed, epoch, rank, worker).
    """

    def __init__(
        self,
        plan: ReadPlan,
        decoder: SampleDecoder,
        rank: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        split: str = "train",
        bucket_sizes: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        if plan.num_workers != max(1, num_workers):
            raise ValueError("plan.num_workers must equal max(1, num_workers)")
        if (plan.buckets is None) != (bucket_sizes is None):
            raise ValueError("a plan with buckets needs their sizes (bucket_sizes), and only such a plan")
        plan.check()
        self.plan, self.decoder, self.rank, self.bucket_sizes = plan, decoder, rank, bucket_sizes
        self.num_workers, self.pin_memory, self.prefetch_factor, self.split = (
            num_workers, pin_memory, prefetch_factor, split
        )
        self._next = (0, 0)  # (epoch, batch) the next iter() starts at
        self._pos = (0, 0)  # (epoch, batches handed out) of the current iteration
        self._consumed: tuple[int, int] | None = None  # (epoch, batches used), when a consumer reports it

    def __len__(self) -> int:
        return self.plan.batches_per_epoch()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = self._next
        n = len(self)
        if start >= n:
            epoch, start = epoch + 1, 0
        self._next = (epoch + 1, 0)
        self._pos = (epoch, start)
        dataset = _EpochStream(self.plan, self.rank, epoch, start, self.decoder, self.bucket_sizes)
        if self.num_workers == 0:
            it: Iterator[dict[str, Any]] = iter(dataset)
        else:
            it = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    prefetch_factor=self.prefetch_factor,
                )
            )
        for index in range(start, n):
            batch = next(it, None)
            if batch is None:  # the read plan promised n batches (index.json counts); the streams held fewer
                raise RuntimeError(f"the shards yielded {index} of the {n} batches of epoch {epoch} (rank "
                                   f"{self.rank}): they hold fewer samples than their index.json counts")
            if "image" in batch and batch["image"].dtype == torch.uint8:
                batch["image"] = uint8_to_float(batch["image"])
            batch[POS_KEY] = (self.split, epoch, index)
            self._pos = (epoch, index + 1)
            yield batch

    def continue_at_next_epoch(self) -> None:
        """Start the next ``iter()`` at the epoch after the current position's, as it does after an iteration (the
        loader moves on an epoch per ``iter()``): so what a stage reads after ``fit`` is the same whether ``fit``
        iterated or resumed at its last step, where Lightning does not iterate."""
        self._next = (self._pos[0] + 1, 0)

    def mark_consumed(self, epoch: int, batches: int) -> None:
        """Report that the first ``batches`` batches of ``epoch`` have been used (a prefetching consumer such as
        Lightning hands out one more batch than it has trained on; the DataModule hook calls this)."""
        self._consumed = (epoch, batches)

    def state_dict(self) -> dict[str, Any]:
        """The position to resume from: after the batches reported consumed, else after those handed out."""
        return self._state(*(self._consumed if self._consumed is not None else self._pos))

    def _state(self, epoch: int, batch: int) -> dict[str, Any]:
        p = self.plan
        return {
            "epoch": epoch,
            "batch": batch,
            "seed": p.seed,
            "world_size": p.world_size,
            "num_workers": p.num_workers,
            "batch_size": p.batch_size,
            "resampled": p.resampled,
            "num_shards": len(p.shards),
            # what else decides the order: the same settings replay the same epochs
            "shuffle_shards": p.shuffle_shards,
            "shuffle_buffer": p.shuffle_buffer,
            "drop_last": p.drop_last,
            "epoch_length": p.epoch_length,
            "shards": shard_digest(p.shards, p.counts),
            **({"buckets": [list(b) for b in self.bucket_sizes]} if self.bucket_sizes is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position; the layout (seed, ranks, workers, batch size, shards) must match."""
        mine = self._state(0, 0)
        # a key the saved state lacks was not recorded when it was saved: not compared
        diff = {k: (state[k], v) for k, v in mine.items()
                if k not in ("epoch", "batch") and k in state and state[k] != v}
        if "shards" in diff and state["shards"] == shard_digest(self.plan.shards, self.plan.counts, legacy=True):
            del diff["shards"]  # recorded under the earlier naming of pipe: shards: the same shards
        if diff:
            raise ValueError(
                f"cannot resume the data position exactly: the layout changed (saved, now) = {diff}. Resume with the "
                "same seed, number of ranks, workers, batch size, shards and shuffling (shuffle_shards, "
                "shuffle_buffer, drop_last, epoch_length)."
            )
        self._next = self._pos = (int(state["epoch"]), int(state["batch"]))
        self._consumed = None


class _ValidationStream(IterableDataset):
    """The batches of one rank's share of the validation set; inside DataLoader worker ``w`` of ``W`` only batches
    ``w, w + W, ...`` (the DataLoader's round robin then delivers them in order). Every worker reads the raw samples
    (cheap) and decodes only its own."""

    def __init__(self, loader: ValidationLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        lo = self.loader
        share = lo.indices_of_rank()
        mine = (i for i in share if lo.batch_of(i) % workers == worker)
        pads = len(share) < lo.per_rank and (lo.per_rank - 1) // lo.batch_size % workers == worker
        wanted = next(mine, None)
        group: list[tuple[int, dict[str, Any]]] = []
        first: dict[str, Any] | None = None  # the rank's first sample: the padding repeats it, with weight 0
        for index, raw in lo.raw_samples():
            if index == share[0] and pads:
                first = raw
            if index != wanted:
                if wanted is None and (first is not None or not pads):
                    break
                continue
            group.append((index, lo.decode(raw)))
            wanted = next(mine, None)
            if len(group) == lo.batch_size:
                yield lo.collate(group)
                group = []
        if wanted is not None:
            raise RuntimeError(f"the validation shards hold fewer than the {lo.num_samples} samples their index.json "
                               "counts: rewrite them")
        if pads:
            assert first is not None
            group.append((-1, lo.decode(first)))
        if group:
            yield lo.collate(group)


class ValidationLoader:
    """The held-out shards in a fixed order (no shuffle, no resampling, no augmentation), every sample exactly once.

    Sample ``i`` of the concatenated shards goes to rank ``i % world_size``. A rank with one sample fewer than the
    others repeats its first one with weight 0, so every rank runs the same number of batches (DDP and FSDP run
    collectives per step). Batches carry ``index`` (LongTensor, the global sample index; -1 for the padding) and
    ``weight`` (1.0, or 0.0 for the padding) besides the training fields.
    """

    def __init__(self, shards: Any, decoder: SampleDecoder, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, pin_memory: bool = False) -> None:
        self.paths, self.counts = resolve_shards(shards)
        self.num_samples = sum(self.counts)
        if self.num_samples < world_size:
            raise ConfigError(f"the validation shards {shards!r} hold {self.num_samples} sample(s), fewer than the "
                              f"{world_size} ranks: every rank needs at least one")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.decoder, self.batch_size, self.rank, self.world_size = decoder, batch_size, rank, world_size
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.per_rank = -(-self.num_samples // world_size)

    def indices_of_rank(self) -> range:
        """The global indices of this rank's samples (without the padding)."""
        return range(self.rank, self.num_samples, self.world_size)

    def batch_of(self, index: int) -> int:
        """The batch (of this rank's) that global sample ``index`` falls in."""
        return index // self.world_size // self.batch_size

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A raw sample as the model sees it (center crop, no flip, the latent mean); a damaged one raises."""
        if "__error__" in raw:
            raise ShardError(f"validation sample {raw['__shard__']}/{raw['__key__']} is damaged ({raw['__error__']}): "
                             "the validation set must be complete; rewrite the shard")
        return self.decoder(raw, _rng("sample", self.seed, 0, raw["__shard__"], raw["__key__"]))

    def raw_samples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(global index, raw sample) over every shard in order; damage raises (the set must be complete)."""
        index = 0
        for path, count in zip(self.paths, self.counts, strict=True):
            for raw in itertools.islice(iter_shard(path), count):
                yield index, raw
                index += 1

    def collate(self, group: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        batch = collate([sample for _, sample in group])
        if "image" in batch and batch["image"].dtype == torch.uint8:
            batch["image"] = uint8_to_float(batch["image"])
        batch["index"] = torch.tensor([i for i, _ in group], dtype=torch.long)
        batch["weight"] = torch.tensor([0.0 if i < 0 else 1.0 for i, _ in group])
        return batch

    def __len__(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = min(self.num_workers, len(self))
        if workers == 0:
            yield from _ValidationStream(self)
            return
        yield from DataLoader(_ValidationStream(self), batch_size=None, num_workers=workers,
                              pin_memory=self.pin_memory)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataModule(L.LightningDataModule):
    """Lightning DataModule over webdataset-compatible shards with exact mid-epoch resume.

    ``train_shards``/``val_shards``: a shard directory (uses its index.json), a brace pattern
    (``data/{000000..000009}.tar``) or a list of paths. ``source="latents"`` reads a latent cache
    (``python -m ldm.data.cache_latents``) instead of images. ``rank``/``world_size`` default to the initialised
    process group (or the trainer's), else 0/1. ``builtin`` names a built-in dataset that ``prepare_data`` writes
    as shards when they are missing: ``{"source": "shapes" | "mnist", "out": folder (default train_shards),
    "length", "size", "maxcount", "seed"}`` (``make_shards``' arguments). Batches: ``image`` [B, C, H, W] in
    [-1, 1] (or ``latent``), ``caption`` (list of str), ``label`` (LongTensor, where every sample has one), ``key``.
    ``buckets`` (``{pixels, step, max_ratio}``, :class:`ldm.data.buckets.BucketSpec`) trains at several aspect
    ratios: each training batch holds images of one bucket's size (validation stays square at ``image_size``).
    ``num_classes`` (a class-conditional UNet's, set by the training stage) checks every batch's labels on the host
    before it moves to the device: a batch without labels, or a label outside [0, num_classes), is a ConfigError.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        image_size: int = 32,
        crop: str = "center",
        hflip: bool = False,
        image_mode: str = "RGB",
        source: str = "images",
        caption_field: str | None = None,
        sample_latents: bool = True,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        builtin: dict[str, Any] | None = None,
        buckets: dict[str, Any] | BucketSpec | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.buckets = BucketSpec.from_config(buckets)
        if self.buckets is not None and source != "images":
            raise ConfigError("data.buckets resizes images to each bucket's size: it needs data.source=images (a "
                              "latent cache holds one size); set ldm_stage.cache_latents=false")
        check_latent_augmentation(source, crop, hflip)
        self.train_shards, self.val_shards = train_shards, val_shards
        self.source, self.builtin = source, dict(builtin) if builtin else None
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_shards, self.shuffle_buffer, self.resampled = shuffle_shards, shuffle_buffer, resampled
        self.epoch_length, self.drop_last, self.seed = epoch_length, drop_last, seed
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.rank, self.world_size = rank, world_size
        self.decoder = SampleDecoder(
            ImageTransform(size=image_size, crop=crop, hflip=hflip, mode=image_mode),
            source=source,
            caption_field=caption_field,
            sample_latents=sample_latents,
        )
        self.val_decoder = SampleDecoder(
            ImageTransform(size=image_size, crop="center", hflip=False, mode=image_mode),
            source=source,
            caption_field=caption_field,
            sample_latents=False,
        )
        self._train: ShardLoader | None = None
        self._pending: dict[str, Any] | None = None

    def _layout(self) -> tuple[int, int]:
        rank, world = _dist_rank_world()
        trainer = getattr(self, "trainer", None)
        if world == 1 and trainer is not None:
            rank, world = trainer.global_rank, trainer.world_size
        return (self.rank if self.rank is not None else rank), (self.world_size or world)

    def _loader(self, shards: Any, train: bool) -> ShardLoader:
        paths, counts = resolve_shards(shards)
        rank, world = self._layout()
        bucketed = self.buckets is not None and train
        buckets = tuple(shard_buckets(p, c, self.buckets) for p, c in zip(paths, counts, strict=True)) \
            if bucketed else None
        plan = ReadPlan(
            shards=tuple(paths),
            counts=tuple(counts),
            batch_size=self.batch_size,
            world_size=world,
            num_workers=max(1, self.num_workers),
            seed=self.seed,
            shuffle_shards=self.shuffle_shards and train,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            resampled=self.resampled and train,
            drop_last=self.drop_last and train,
            epoch_length=self.epoch_length if train else None,
            buckets=buckets,
        )
        return ShardLoader(
            plan,
            self.decoder if train else self.val_decoder,
            bucket_sizes=self.buckets.sizes() if bucketed else None,
            rank=rank,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            split="train" if train else "val",
        )

    def prepare_data(self) -> None:
        """Write the built-in dataset's shards once (Lightning calls this on one process per node), if ``builtin``
        names one and its index.json is missing. A latent cache is written by ``cache_latents`` instead."""
        if not self.builtin or self.source == "latents":
            return
        out = Path(self.builtin.get("out") or self.train_shards)
        if (out / "index.json").exists():
            self._check_builtin_settings(out)
            return
        from ldm.data.make_shards import make_shards

        report = make_shards(self.builtin["source"], out, maxcount=self.builtin.get("maxcount", 1000),
                             size=self.builtin.get("size"), length=self.builtin.get("length"),
                             seed=self.builtin.get("seed", 0), log=None, colors=self.builtin.get("colors"))
        print(f"built-in dataset {self.builtin['source']!r} -> {out}: {report.text()}")

    def _check_builtin_settings(self, out: Path) -> None:
        """ConfigError when the complete shards in ``out`` were made with other built-in settings than ``builtin``
        asks for (make_shards' run record): reusing them would train on the old data without a word."""
        from ldm.data.make_shards import BUILTIN_DEFAULTS, ITEM_ORDER, RUN_NAME, STATS_DIR

        path = out / STATS_DIR / RUN_NAME
        if not path.is_file():  # shards of another tool, or of make_shards before it kept the record: as they are
            return
        try:
            run = json.loads(path.read_text())
        except ValueError:
            return
        source = self.builtin["source"]
        wanted = {"source": source, "length": self.builtin.get("length"), "size": self.builtin.get("size"),
                  "seed": self.builtin.get("seed", 0),
                  "colors": list(self.builtin["colors"]) if self.builtin.get("colors") is not None else None,
                  "order": ITEM_ORDER.get(source)}
        made = {k: run.get(k, 0 if k == "seed" else None) for k in wanted}
        defaults = BUILTIN_DEFAULTS.get(source, {})  # None means the dataset's default: compare what it stands for
        for values in (wanted, made):
            values.update({k: v for k, v in defaults.items() if values[k] is None})
        changed = {k: (made[k], v) for k, v in wanted.items()
                   if made[k] != v and (k not in ("length", "size") or None not in (made[k], v))}
        if changed:
            said = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(f"{out} holds {run.get('source')} shards made with other settings than this run's "
                              f"dataset block ({said}): set another data.train_shards for these settings (e.g. a "
                              f"folder named after them), or delete {out} to write it again")

    def setup(self, stage: str | None = None) -> None:
        """Resolve shards and check the layout early (too few shards for ranks x workers raises here)."""
        if self._train is None and stage in (None, "fit"):
            self._train = self._loader(self.train_shards, train=True)
            if self._pending is not None:
                self._train.load_state_dict(self._pending)
                self._pending = None

    def train_dataloader(self) -> ShardLoader:
        self.setup("fit")
        assert self._train is not None
        return self._train

    def val_dataloader(self) -> ValidationLoader | list[Any]:
        """The held-out shards (``val_shards``) for the validation loss: fixed order, every sample once, padded so
        that every rank runs the same number of batches (:class:`ValidationLoader`); empty without them."""
        if self.val_shards is None:
            return []
        rank, world = self._layout()
        return ValidationLoader(self.val_shards, self.val_decoder, self.batch_size, rank=rank, world_size=world,
                                num_workers=self.num_workers, seed=self.seed, pin_memory=self.pin_memory)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position of the batch about to be used and drop the tag (Lightning does not prefetch from a
        loader with a length (ours), but other fetchers do: the position follows what the model saw); check its class
        labels against ``num_classes`` (:func:`~ldm.data.transforms.check_labels`)."""
        if isinstance(batch, dict) and POS_KEY in batch:
            split, epoch, index = batch.pop(POS_KEY)
            if split == "train" and self._train is not None:
                self._train.mark_consumed(epoch, index + 1)
        if isinstance(batch, dict):
            check_labels(batch, self.num_classes)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The data position: (epoch, batches consumed) of the last batch handed to the model, plus its layout."""
        if self._train is None:
            return dict(self._pending or {})
        return self._train.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._train is None:
            self._pending = dict(state_dict)
        else:
            self._train.load_state_dict(state_dict)


def check_latent_augmentation(source: str, crop: str, hflip: bool) -> None:
    """ConfigError for ``crop``/``hflip`` augmentation on a latent cache: its latents were encoded once, centre-cropped
    and unflipped (as ``ldm_stage.cache_latents=true`` refuses these settings), so they would do nothing."""
    if source == "latents" and (crop != "center" or bool(hflip)):
        raise ConfigError(
            f"data.source=latents reads latents encoded once, centre-cropped and unflipped, so data.crop={crop} "
            f"data.hflip={str(bool(hflip)).lower()} would augment nothing. Set data.crop=center data.hflip=false, or "
            "data.source=images (with ldm_stage.cache_latents=false) to encode each augmented image while training")
