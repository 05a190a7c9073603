"""The deterministic validation loss: fixed timesteps, noise seeded per sample index (so batch size, rank count and
call order change nothing), the objective's target unweighted, flow matching; and the validation loader (fixed
order, every sample once over ranks, equal batch counts)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ldm.data.datamodule import ShardDataModule
from ldm.data.make_shards import make_shards
from ldm.diffusion import DiffusionLoss, NoiseSchedule
from ldm.diffusion.flow import FlowMatchingLoss
from ldm.diffusion.validation import validation_losses, validation_noise, validation_timesteps
from tests.module_factory import diffusion_module
from tests.unit.test_lightning_modules import HashTextEncoder, image_batches, tiny_unet, tiny_vae
from tests.unit.test_lightning_modules import collate as lm_collate

SHAPE = (2, 4, 4)


class Denoiser(nn.Module):
    """A deterministic stand-in for the UNet: a 1x1 convolution of x_t plus a term in t (so t matters)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(SHAPE[0], SHAPE[0], 1)

    def forward(self, x, t, cond=None):
        return self.conv(x) + (t.float() / 1000).view(-1, 1, 1, 1)


def objective(kind: str):
    if kind == "flow":
        return FlowMatchingLoss(num_train_timesteps=1000)
    return DiffusionLoss(NoiseSchedule.from_name("cosine"), prediction_type=kind)


def data(n: int = 8) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(123))


def losses_of(obj, net, x0, indices, timesteps, seed=0):
    noise = validation_noise(SHAPE, indices, len(timesteps), seed)
    with torch.no_grad():
        return validation_losses(obj, net, x0, None, timesteps, noise)


def test_timesteps_are_the_centres_of_equal_bins():
    assert validation_timesteps(1000, 8) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert validation_timesteps(1000, 1) == [500]
    assert validation_timesteps(10, 10) == list(range(10))
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="validation timesteps"):
            validation_timesteps(1000, bad)


def test_noise_depends_only_on_the_sample_index_and_seed():
    full = validation_noise(SHAPE, range(6), 3)
    assert full.shape == (3, 6, *SHAPE)
    assert torch.equal(validation_noise(SHAPE, [4, 1], 3), full[:, [4, 1]])  # any batch, any order
    assert torch.equal(validation_noise(SHAPE, torch.tensor([2]), 3), full[:, [2]])
    assert not torch.equal(validation_noise(SHAPE, range(6), 3, seed=1), full)
    assert not torch.equal(full[0], full[1])  # a fresh draw per timestep


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "flow"])
def test_same_value_for_any_batch_size_and_call(kind):
    obj, net, x0 = objective(kind), Denoiser(), data()
    ts = validation_timesteps(1000, 4)
    whole = losses_of(obj, net, x0, range(8), ts)
    assert whole.shape == (4, 8) and torch.isfinite(whole).all()
    pieces = torch.cat([losses_of(obj, net, x0[i:i + 3], range(i, min(i + 3, 8)), ts) for i in range(0, 8, 3)], 1)
    torch.testing.assert_close(pieces, whole)
    assert torch.equal(losses_of(obj, net, x0, range(8), ts), whole)  # a second call: the same numbers
    # a "rank" holding every other sample computes the same per-sample values
    torch.testing.assert_close(losses_of(obj, net, x0[1::2], range(1, 8, 2), ts), whole[:, 1::2])


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_values_equal_a_hand_computation(kind):
    obj, net, x0 = objective(kind), Denoiser(), data(4)
    ts = [10, 500, 990]
    noise = validation_noise(SHAPE, range(4), len(ts))
    got = validation_losses(obj, net, x0, None, ts, noise)
    a_all = obj.schedule.alphas_cumprod
    for k, t in enumerate(ts):
        a, eps = a_all[t].float(), noise[k]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]
        pred = net(x_t, torch.full((4,), t))
        want = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(got[k], want.detach(), rtol=1e-5, atol=1e-6)


def test_flow_matching_uses_fixed_levels_t_over_T_and_the_velocity():
    obj, x0 = objective("flow"), data(4)
    seen = []

    def net(x, t, cond):
        seen.append(t.clone())
        return torch.zeros_like(x) + 0.1 * x

    ts = validation_timesteps(1000, 2)  # sigma 0.25 and 0.75
    noise = validation_noise(SHAPE, range(4), 2)
    got = validation_losses(obj, net, x0, None, ts, noise)
    for k, t in enumerate(ts):
        s = t / 1000
        torch.testing.assert_close(seen[k], torch.full((4,), float(t)))  # the network sees sigma * T
        x_t = (1 - s) * x0 + s * noise[k]
        want = ((0.1 * x_t - (noise[k] - x0)) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(got[k], want)
    shifted = FlowMatchingLoss(num_train_timesteps=1000, shift=3.0, weighting="cosmap")
    torch.testing.assert_close(validation_losses(shifted, net, x0, None, ts, noise), got)  # levels fixed, unweighted


def test_training_weighting_does_not_enter_and_other_weights_change_the_value():
    x0, ts = data(), validation_timesteps(1000, 8)
    uniform = losses_of(objective("epsilon"), Denoiser(), x0, range(8), ts)
    min_snr = DiffusionLoss(NoiseSchedule.from_name("cosine"), "epsilon", weighting="min_snr", offset_noise=0.1)
    torch.testing.assert_close(losses_of(min_snr, Denoiser(), x0, range(8), ts), uniform)
    other = losses_of(objective("epsilon"), Denoiser(seed=1), x0, range(8), ts)
    assert not torch.allclose(other.mean(1), uniform.mean(1))


def test_the_training_loss_is_unchanged_by_the_shared_per_sample_mse():
    """DiffusionLoss / FlowMatchingLoss route their MSE through per_sample_mse: same value as the formula."""
    net, x0 = Denoiser(), data(4)
    t, eps = torch.tensor([3, 300, 600, 999]), torch.randn(4, *SHAPE)
    loss = objective("v_prediction")
    a = loss.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    pred = net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t)
    want = ((pred - (a.sqrt() * eps - (1 - a).sqrt() * x0)) ** 2).mean()
    torch.testing.assert_close(loss(net, x0, None, t=t, noise=eps), want)
    flow, sigma = objective("flow"), torch.tensor([0.1, 0.4, 0.6, 0.9])
    s = sigma.view(-1, 1, 1, 1)
    want = ((net((1 - s) * x0 + s * eps, sigma * 1000) - (eps - x0)) ** 2).mean()
    torch.testing.assert_close(flow(net, x0, None, sigma=sigma, noise=eps), want)


# ------------------------------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("val")
    make_shards("shapes", out, maxcount=4, length=11, size=16, log=None)  # 3 shards: 4, 4, 3
    return out


def _val(path, batch_size, rank=0, world=1, workers=0):
    dm = ShardDataModule(str(path), val_shards=str(path), batch_size=batch_size, image_size=16, num_workers=workers,
                         rank=rank, world_size=world)
    return dm.val_dataloader()


def test_validation_loader_reads_every_sample_once_in_a_fixed_order(val_dir):
    batches = list(_val(val_dir, 4))
    assert [len(b["key"]) for b in batches] == [4, 4, 3]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(11))
    assert all(b["weight"].eq(1).all() for b in batches)
    again = list(_val(val_dir, 4, workers=2))  # DataLoader workers deliver the same batches in the same order
    assert [k for b in again for k in b["key"]] == [k for b in batches for k in b["key"]]
    torch.testing.assert_close(torch.cat([b["image"] for b in again]), torch.cat([b["image"] for b in batches]))


@pytest.mark.parametrize("world,batch_size,workers", [(2, 2, 0), (3, 4, 0), (2, 1, 2), (4, 3, 2)])
def test_validation_loader_splits_over_ranks_with_equal_batch_counts(val_dir, world, batch_size, workers):
    loaders = [_val(val_dir, batch_size, r, world, workers) for r in range(world)]
    assert len({len(lo) for lo in loaders}) == 1
    real = []
    for lo in loaders:
        batches = list(lo)
        assert len(batches) == len(lo)  # the promised count: no rank runs an extra step
        for b in batches:
            real += b["index"][b["weight"] > 0].tolist()
            assert (b["index"][b["weight"] == 0] == -1).all()
    assert sorted(real) == list(range(11))  # every sample exactly once over the ranks


# ------------------------------------------------------------------------------------------------- the module


def _val_batches(n: int = 6, batch_size: int = 4) -> list[dict]:
    items = image_batches(8, seed=5)[:n]
    out = []
    for s in range(0, n, batch_size):
        batch = lm_collate(items[s:s + batch_size])
        batch["index"] = torch.arange(s, s + len(batch["caption"]))
        batch["weight"] = torch.ones(len(batch["caption"]))
        out.append(batch)
    out[-1]["index"][-1], out[-1]["weight"][-1] = -1, 0.0  # a rank's padding sample: counted nowhere
    return out


def _module_and_fit(tmp_path, validate: bool):
    torch.manual_seed(0)
    module = diffusion_module(tiny_unet(), HashTextEncoder(), tiny_vae(), schedule={"schedule": "cosine"},
                              prediction_type="v_prediction", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                              ema_decay=0.5, max_steps=3)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=None if validate else 0, val_check_interval=2,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0)
    loader = DataLoader(image_batches(), batch_size=4, collate_fn=lm_collate)
    trainer.fit(module, loader, DataLoader(_val_batches(), batch_size=None) if validate else None)
    return module, trainer


def test_module_validation_uses_the_ema_weights_and_leaves_training_untouched(tmp_path):
    validated, trainer = _module_and_fit(tmp_path, validate=True)
    plain, _ = _module_and_fit(tmp_path, validate=False)
    for key, value in plain.state_dict().items():  # the same training (weights, EMA, generator draws)
        assert torch.equal(validated.state_dict()[key], value), key
    assert torch.equal(validated.generator.get_state(), plain.generator.get_state())
    # the last validation (after step 3, the end) measured the EMA weights on the 5 real samples
    m = validated
    totals, count = torch.zeros(8, dtype=torch.float64), 0
    with torch.no_grad(), m.ema.swapped_in(m.unet):
        m.eval()
        for batch in _val_batches():
            keep = batch["weight"] > 0
            x0 = m.validation_latents(batch)[keep]
            ctx = m.encode_text([c for c, k in zip(batch["caption"], keep, strict=True) if k])
            noise = validation_noise(x0.shape[1:], batch["index"][keep], 8)
            totals += validation_losses(m.loss_fn, m.denoise, x0, ctx, m.val_timesteps, noise).double().sum(1)
            count += int(keep.sum())
    means = totals / count
    metrics = trainer.callback_metrics
    for t, value in zip(m.val_timesteps, means, strict=True):
        assert float(metrics[f"val/loss_t{t}"]) == pytest.approx(float(value), rel=1e-5)
    assert float(metrics["val/loss"]) == pytest.approx(float(means.mean()), rel=1e-5)
    with torch.no_grad():  # the raw weights give another value: the EMA was measured
        m.eval()
        batch = _val_batches()[0]
        x0 = m.validation_latents(batch)
        raw = validation_losses(m.loss_fn, m.denoise, x0, m.encode_text(batch["caption"]), m.val_timesteps,
                                validation_noise(x0.shape[1:], batch["index"], 8))
        with m.ema.swapped_in(m.unet):
            ema = validation_losses(m.loss_fn, m.denoise, x0, m.encode_text(batch["caption"]), m.val_timesteps,
                                    validation_noise(x0.shape[1:], batch["index"], 8))
    assert not torch.allclose(raw, ema)
