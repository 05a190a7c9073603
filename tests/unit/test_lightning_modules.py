"""The training modules: EMA, caption dropout, LR schedule, and a few real optimisation steps of each stage."""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace
from unittest import mock

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from ldm.autoencoder import AutoencoderKL
from ldm.checkpoint import load_autoencoder, save_autoencoder
from ldm.lightning.autoencoder_module import AutoencoderModule
from ldm.lightning.callbacks import Throughput
from ldm.lightning.optim import warmup_then
from ldm.nn.ema import EMA
from ldm.text import ScratchTextEncoder
from ldm.unet import UNet
from tests.module_factory import diffusion_module


class HashTextEncoder(nn.Module):
    """A stand-in text encoder: one learned vector per character, mean-free of any tokenizer."""

    def __init__(self, width: int = 32, length: int = 8):
        super().__init__()
        self.emb = nn.Embedding(128, width)
        self.length = length
        self.width = width

    def encode(self, prompts):
        ids = torch.zeros(len(prompts), self.length, dtype=torch.long)
        for i, p in enumerate(prompts):
            codes = [ord(c) % 128 for c in p[: self.length]]
            ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        return SimpleNamespace(hidden=self.emb(ids), pooled=None, mask=ids > 0)


def tiny_unet(in_ch=4, context_dim=32, num_classes=None):
    return UNet(in_channels=in_ch, out_channels=in_ch, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(1, 2) if context_dim else (), num_heads=2, context_dim=context_dim,
                num_classes=num_classes)


def tiny_vae():
    return AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, scale_factor=1.0)


def image_batches(n=16, size=16, seed=0):
    # Learnable data: a flat colour per caption plus a little noise.
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[0.9, -0.8, -0.8], [-0.8, -0.6, 0.9], [-0.8, 0.7, -0.6], [0.9, 0.9, 0.9]])
    images = colours.repeat(n // 4, 1)[:, :, None, None] + 0.05 * torch.randn(n, 3, size, size, generator=g)
    captions = [f"a {c} square" for c in ("red", "blue", "green", "white")] * (n // 4)
    return [{"image": images[i], "caption": captions[i], "label": i % 10} for i in range(n)]


def collate(items):
    return {"image": torch.stack([i["image"] for i in items]), "caption": [i["caption"] for i in items],
            "label": torch.tensor([i["label"] for i in items])}


def trainer(steps, tmp_path):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


def test_ema_follows_the_model_with_warmup_and_swaps_in():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.99, warmup=True)
    assert ema.current_decay() == 0.0  # the first update starts the average at the weights (diffusers' EMAModel)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow_0, before + 1.0)
    assert ema.current_decay() == pytest.approx(2 / 11)  # (1 + 1) / (10 + 1) at the second
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    average = before + 2.0 - 2 / 11  # moved 1 - 2/11 of the way from before + 1 to before + 2
    torch.testing.assert_close(ema.shadow_0, average)
    trained = model.weight.detach().clone()
    with ema.swapped_in(model):
        torch.testing.assert_close(model.weight, average)
    torch.testing.assert_close(model.weight, trained)
    state = ema.state_dict()  # the averages under the parameters' own names: a plain load_state_dict reads them
    assert list(state) == ["weight", "bias", "num_updates"] and int(state["num_updates"]) == 2
    plain = nn.Linear(3, 3)
    plain.load_state_dict({k: v for k, v in state.items() if k != "num_updates"})
    torch.testing.assert_close(plain.weight, average)
    again = EMA(nn.Linear(3, 3), decay=0.99)
    again.load_state_dict(state)
    torch.testing.assert_close(again.averaged_state_dict()["weight"], average)
    assert int(again.num_updates) == 2
    with pytest.raises(RuntimeError, match="Unexpected key"):
        again.load_state_dict({**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)
    # a bf16 model keeps a float32 shadow, updated from the upcast parameters
    half = nn.Linear(3, 3).to(torch.bfloat16)
    ema16 = EMA(half, decay=0.5, warmup=False)
    start = ema16.shadow_0.clone()
    with torch.no_grad():
        half.weight.add_(1.0)
    ema16.update(half)
    assert ema16.shadow_0.dtype == torch.float32
    torch.testing.assert_close(ema16.shadow_0, 0.5 * start + 0.5 * half.weight.float())


def test_a_cast_module_keeps_its_ema_in_float32_and_trains_under_bf16_true():
    """Lightning's bf16-true casts the whole module, the EMA's buffers with it: the update then crashed (a bf16 lerp
    end against float32 weights), and bf16 averages would not move by 1 - decay. The averages stay float32."""
    class Net(nn.Module):
        num_classes = None

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.full((), 1.0))

        def forward(self, x, t, context=None):
            return x * self.w

    net = Net()
    m = diffusion_module(net, ema_decay=0.999, ema_warmup=False, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    L.Trainer(max_steps=4, accelerator="cpu", precision="bf16-true", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        m, DataLoader(image_batches(16, size=8), batch_size=4, collate_fn=collate))
    assert net.w.dtype == torch.bfloat16 and m.ema.shadow_0.dtype == torch.float32 and int(m.ema.num_updates) == 4
    assert 0 < abs(float(m.ema.shadow_0) - 1.0) < abs(float(net.w) - 1.0)  # moved, by less than the model
    for cast in (lambda mod: mod.half(), lambda mod: mod.to(torch.float64), lambda mod: mod.to("cpu", torch.bfloat16)):
        cast(m)
        assert m.ema.shadow_0.dtype == torch.float32 and m.ema.num_updates.dtype == torch.int64


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_averages_as_diffusers_ema_model_does(warmup):
    """Oracle: diffusers' EMAModel. With warm-up its decay is ours at every update: 0 at the first (the average
    starts as the weights) and min((1 + n) / (10 + n), decay) at update n + 1 (use_ema_warmup=False), so both start
    from the same model. Without, ours is a constant decay and diffusers' (min_decay = decay) is too after its first
    step, which copies the model: it starts from our average after our first update."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    decay = 0.9  # reached at update 81 with warmup: the cap is checked too
    ema = EMA(model, decay=decay, warmup=warmup)

    def theirs_from(params):
        made = EMAModel([p.detach().clone() for p in params], decay=decay, min_decay=0.0 if warmup else decay,
                        use_ema_warmup=False)
        return made

    theirs = theirs_from(model.parameters()) if warmup else None
    for n in range(100):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        if theirs is not None:
            assert ema.current_decay() == pytest.approx(theirs.get_decay(theirs.optimization_step + 1), rel=1e-12)
            theirs.step(model.parameters())
        ema.update(model)
        if theirs is None:
            theirs = theirs_from(ema.averaged_state_dict().values())
            theirs.optimization_step = 1
        if n in (0, 1, 10, 99):
            for ours, other in zip(ema.averaged_state_dict().values(), theirs.shadow_params, strict=True):
                torch.testing.assert_close(ours, other, rtol=1e-5, atol=1e-6)
    assert ema.current_decay() == decay


def test_ema_refuses_what_it_cannot_average():
    with pytest.raises(ValueError, match="num_updates.*collides"):
        EMA(nn.ParameterDict({"num_updates": nn.Parameter(torch.zeros(2))}))
    model = nn.Linear(4, 3)
    ema = EMA(model)
    from ldm.nn.ema import ShardLayout

    def layout(spans, rank=0):
        return ShardLayout(spans, rank, lambda t: [t] * len(spans))

    ema.keep_shards(layout([{"weight": (0, 6)}, {"weight": (6, 12)}]))
    assert ema.sharded
    with pytest.raises(RuntimeError, match="already kept in other shards"):
        ema.keep_shards(layout([{"weight": (0, 4)}, {"weight": (4, 12)}]))
    ema.keep_shards(layout([{"weight": (0, 6)}, {"weight": (6, 12)}]))  # the same shards again: kept
    with pytest.raises(RuntimeError, match="weight has 5 elements here and its average 6 of 12: the model is not "
                                           "sharded as it was at keep_shards"):
        ema.update(nn.ParameterDict({"weight": nn.Parameter(torch.zeros(5)), "bias": nn.Parameter(torch.zeros(3))}))


def test_lr_warmup_then_cosine():
    f = warmup_then("cosine", 10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert warmup_then("constant", 0, 5)(100) == 1.0
    lin = warmup_then("linear", 10, 110)
    assert lin(9) == pytest.approx(1.0) and lin(35) == pytest.approx(0.75) and lin(60) == pytest.approx(0.5)
    assert lin(110) == pytest.approx(0.0) and lin(500) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="'constant', 'cosine', 'linear' or 'wsd'"):
        warmup_then("step", 0, 1)


def test_lr_warmup_stable_decay():
    """wsd: warm-up, the full rate until the last decay_fraction of the steps, then linear to 0 at max_steps."""
    f = warmup_then("wsd", 10, 110, decay_fraction=0.25)  # decay over steps 82.5 -> 110 (round: 82)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == f(50) == f(82) == 1.0
    assert f(96) == pytest.approx(14 / 28) and f(109) == pytest.approx(1 / 28) and f(110) == 0.0 and f(200) == 0.0
    assert warmup_then("wsd", 0, 100, decay_fraction=1.0)(50) == pytest.approx(0.5)  # all decay: linear
    with pytest.raises(ValueError, match="lr_decay_fraction must be in"):
        warmup_then("wsd", 0, 100, decay_fraction=0.0)


def test_latent_diffusion_module_learns_and_updates_ema(tmp_path):
    torch.manual_seed(0)
    unet, vae, text = tiny_unet(), tiny_vae(), HashTextEncoder()
    vae_before = {k: v.clone() for k, v in vae.state_dict().items()}
    module = diffusion_module(
        unet, text, vae, schedule={"schedule": "cosine"}, prediction_type="epsilon", caption_dropout=0.1,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), ema_decay=0.9, max_steps=30,
        sampling={"image_size": 16, "guidance_scale": 3.0, "num_inference_steps": 4},
    )
    ema_before = module.ema.shadow_0.clone()
    loader = DataLoader(image_batches(), batch_size=8, collate_fn=collate, shuffle=True)
    # A fixed evaluation loss (same images, t and noise) before and after training.
    batch = collate(image_batches(8, seed=3))
    g = torch.Generator().manual_seed(0)
    t_eval = torch.randint(0, 1000, (8,), generator=g)
    noise = torch.randn(8, 4, 8, 8, generator=g)

    def eval_loss():
        with torch.no_grad():
            x0, ctx = module.latents_of(batch), module.encode_text(batch["caption"])
            return float(module.loss_fn(lambda x, t, c: module.denoise(x, t, c), x0, ctx, t=t_eval, noise=noise))

    first = eval_loss()
    trainer(30, tmp_path).fit(module, loader)
    last = eval_loss()
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert not torch.equal(module.ema.shadow_0, ema_before) and int(module.ema.num_updates) == 30
    for k, v in vae.state_dict().items():  # the first stage is frozen
        assert torch.equal(v, vae_before[k]), k
    assert any(p.grad is not None for p in text.parameters())  # a trainable text encoder is optimised too
    images = module.generate(["a red square", "a blue square"], generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    again = module.generate(["a red square", "a blue square"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again)
    # one generation path: the grid is the public pipeline's output with the EMA weights swapped in, and the
    # module leaves sampling in training mode with its trained weights
    assert module.training and module.unet.training and not module.first_stage.training
    trained = {k: v.clone() for k, v in unet.state_dict().items()}
    with module.ema.swapped_in(unet):
        direct = module.pipeline()(["a red square", "a blue square"], generator=torch.Generator().manual_seed(0),
                                   output_type="tensor")
    torch.testing.assert_close(images, direct, rtol=0, atol=0)
    assert all(torch.equal(v, trained[k]) for k, v in unet.state_dict().items())


def test_a_fixed_token_embedding_is_left_out_of_the_optimizer_and_stays_put(tmp_path):
    torch.manual_seed(0)
    text = ScratchTextEncoder(width=32, layers=1, heads=4, context_length=8, train_token_embedding=False)
    module = diffusion_module(tiny_unet(), text, tiny_vae(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                              ema_decay=None, max_steps=3)
    optimised = {id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert id(text.token_embedding.weight) not in optimised
    assert all(id(p) in optimised for n, p in text.named_parameters() if n != "token_embedding.weight")
    from ldm.lightning.console import parts_summary

    trained = sum(p.numel() for p in text.parameters()) - text.token_embedding.weight.numel()
    summary = parts_summary(module)  # the stage's headline says what trains
    assert f"text_encoder ScratchTextEncoder 1.6 M ({trained / 1e3:.0f} K trained)" in summary, summary
    assert "first_stage AutoencoderKL" in summary and "(frozen)" in summary and "unet UNet" in summary
    table, blocks = text.token_embedding.weight.clone(), text.blocks[0].mlp[0].weight.clone()
    trainer(3, tmp_path).fit(module, DataLoader(image_batches(), batch_size=8, collate_fn=collate))
    assert torch.equal(text.token_embedding.weight, table) and not torch.equal(text.blocks[0].mlp[0].weight, blocks)


def test_pixel_space_class_conditional_module(tmp_path):
    unet = tiny_unet(in_ch=3, context_dim=None, num_classes=10)
    module = diffusion_module(unet, None, None, schedule={"schedule": "linear"}, ema_decay=None,
                                   optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                                   sampling={"image_size": 16, "sampler": "ddpm", "num_inference_steps": 3})
    trainer(4, tmp_path).fit(module, DataLoader(image_batches(), batch_size=8, collate_fn=collate))
    out = module.generate(["", ""], class_labels=torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16)


def test_nan_loss_stops_with_a_clear_message_or_is_skipped(tmp_path):
    class NaNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))
            self.num_classes = None

        def forward(self, x, t, context=None):
            return x * self.w * float("nan")

    stop = diffusion_module(NaNNet(), None, None, ema_decay=None)
    with pytest.raises(FloatingPointError, match="nan_policy=skip"):
        trainer(2, tmp_path).fit(stop, DataLoader(image_batches(8), batch_size=4, collate_fn=collate))
    skip = diffusion_module(NaNNet(), None, None, ema_decay=None, nan_policy="skip", max_nan_skips=10)
    trainer(2, tmp_path).fit(skip, DataLoader(image_batches(8), batch_size=4, collate_fn=collate))
    assert skip.nan_skips == 2 and torch.equal(skip.unet.w.detach(), torch.ones(()))


class NaNAtSteps(nn.Module):
    """A one-weight denoiser whose output (so its loss and gradient) is NaN at the given forward calls."""

    def __init__(self, nan_at=()):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.num_classes = None
        self.nan_at, self.calls = set(nan_at), 0

    def forward(self, x, t, context=None):
        self.calls += 1
        out = x * self.w
        return out * float("nan") if self.calls - 1 in self.nan_at else out


def fused_adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, fused=True)


def skipped_nan_steps(tmp_path, accelerator: str = "cpu"):
    """Four steps of fused AdamW whose steps 1 and 2 are NaN, under nan_policy=skip, checked for the skips:
    (module, trainer)."""
    net = NaNAtSteps(nan_at={1, 2})
    module = diffusion_module(net, None, None, ema_decay=0.9, nan_policy="skip", max_nan_skips=2,
                              optimizer=fused_adamw)
    weights = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights.append(net.w.detach().cpu().clone())

    trainer = L.Trainer(max_steps=4, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Record()])
    trainer.fit(module, DataLoader(image_batches(16), batch_size=4, collate_fn=collate))
    # the fused kernel leaves the weight and its Adam state as they were at the NaN steps; the count comes two late
    assert module.nonfinite.on_device and module.nan_skips == 2
    assert not torch.equal(weights[0], torch.ones(())) and torch.equal(weights[1], weights[0])
    assert torch.equal(weights[2], weights[0]) and not torch.equal(weights[3], weights[2])
    return module, trainer


def test_with_a_fused_optimizer_nonfinite_steps_are_skipped_on_the_device(tmp_path):
    module, recorded = skipped_nan_steps(tmp_path)
    net = module.unet
    data = DataLoader(image_batches(16), batch_size=4, collate_fn=collate)
    opt = recorded.optimizers[0]
    assert int(opt.state[net.w]["step"]) == 2 and not hasattr(opt, "found_inf")
    assert torch.isfinite(net.w) and all(torch.isfinite(s).all() for s in opt.state[net.w].values())
    assert module.ema.num_updates == 4 and torch.isfinite(module.ema.shadow_0)

    # stop: raised when the count is read, two steps late, naming the step; the weights stay those of step 0
    stop = diffusion_module(NaNAtSteps(nan_at={1}), None, None, ema_decay=None, optimizer=fused_adamw)
    with pytest.raises(FloatingPointError, match=r"gradients are not finite at step 1 .*nan_policy=skip"):
        trainer_ = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer_.fit(stop, data)
    assert trainer_.global_step == 3 and torch.isfinite(stop.unet.w)
    # skip, past max_skips: the third skipped step ends the run
    many = diffusion_module(NaNAtSteps(nan_at=set(range(8))), None, None, ema_decay=None, nan_policy="skip",
                            max_nan_skips=2, optimizer=fused_adamw)
    with pytest.raises(FloatingPointError, match=r"at step 2 \(skipped so far: 2\)"):
        trainer(8, tmp_path).fit(many, data)
    assert torch.equal(many.unet.w.detach(), torch.ones(()))


class DeviceReads(TorchDispatchMode):
    """Counts the reads of tensor values on the host (``.item()``, ``bool``, ``int``, ``float`` of a tensor: each an
    ``aten._local_scalar_dense``; on a GPU each makes the host wait for it), except LaggedReads' deferred ones (on a
    GPU: pinned host copies made steps earlier)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    @staticmethod
    def _deferred() -> bool:
        frame = sys._getframe()
        while frame is not None:
            if frame.f_code.co_name == "_read" and frame.f_code.co_filename.endswith("host_reads.py"):
                return True
            frame = frame.f_back
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default) and not self._deferred():
            self.reads += 1
        return func(*args, **(kwargs or {}))


class WatchSteps(L.Callback):
    """Counts ``DeviceReads`` from the start of each training step after the first (which sets things up, e.g. the
    EMA's count is read once) to the start of the next: Lightning collects the logged values in between."""

    def __init__(self):
        self.mode = DeviceReads()
        self.watching = False

    def _stop(self):
        if self.watching:
            self.mode.__exit__(None, None, None)
            self.watching = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._stop()
        if batch_idx >= 1:
            self.mode.__enter__()
            self.watching = True

    def on_train_end(self, trainer, pl_module):
        self._stop()


def logs_of_python_numbers(module: L.LightningModule) -> list[str]:
    """The names ``module`` logs Python numbers under, filled in as it trains: Lightning copies a Python number to
    the module's device with a blocking copy, which waits for a GPU."""
    numbers = []
    log = module.log
    module.log = lambda name, value, *a, **k: (numbers.append(name) if not torch.is_tensor(value) else None,
                                               log(name, value, *a, **k))[1]
    return numbers


def test_a_training_step_reads_no_value_back_from_the_device(tmp_path):
    """The step (forward, loss, backward, clipping, fused AdamW, EMA, the non-finite test, logging, and Lightning's
    collection of the logged values after the step) makes no host read of a device value, with the real UNet,
    tokenizer and trainable text encoder, and logs no Python number."""
    text = ScratchTextEncoder(width=32, layers=1, heads=2, context_length=8)
    module = diffusion_module(tiny_unet(), text, tiny_vae(), ema_decay=0.99, optimizer=fused_adamw)
    numbers = logs_of_python_numbers(module)
    watch = WatchSteps()
    watched = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        gradient_clip_val=1.0, callbacks=[watch, Throughput()])
    watched.fit(module, DataLoader(image_batches(16), batch_size=4, collate_fn=collate))
    assert module.nonfinite.on_device and watched.global_step == 4
    assert watch.mode.reads == 0, f"{watch.mode.reads} reads of device values in 3 training steps"
    assert numbers == [], f"logged as Python numbers: {sorted(set(numbers))}"


def test_a_bad_guidance_interval_fails_at_construction_not_at_the_first_sample_grid():
    net = nn.Conv2d(4, 4, 1)
    with pytest.raises(ValueError, match=r"guidance_interval \[lo, hi\] needs 0 <= lo <= hi"):
        diffusion_module(net, None, None, ema_decay=None, sampling={"guidance_interval": [600, 400]})
    with pytest.raises(ValueError, match="two timesteps"):
        diffusion_module(net, None, None, ema_decay=None, sampling={"guidance_interval": 400})
    ok = diffusion_module(net, None, None, ema_decay=None, sampling={"guidance_interval": [400, 1000]})
    assert ok.sampling.guidance_interval == (400, 1000)


def test_autoencoder_module_trains_with_gan_and_fits_latent_scale(tmp_path):
    torch.manual_seed(0)
    vae = tiny_vae()
    module = AutoencoderModule(vae, lr=1e-3, disc_start=3, disc_layers=2, disc_channels=8)
    d_before = [p.clone() for p in module.discriminator.parameters()]
    trainer(6, tmp_path).fit(module, DataLoader(image_batches(), batch_size=8, collate_fn=collate))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, module.discriminator.parameters(), strict=True))
    images = torch.stack([b["image"] for b in image_batches(8)])
    fitted = module.fit_latent_normalization(images)
    scale = vae.config["scale_factor"]
    assert fitted == f"latent scale {scale:.4f}" and torch.all(vae.latent_scale == scale)
    with torch.no_grad():  # the same posterior samples (the module's seed), drawn again: unit spread once scaled
        raw = vae.encode(images).sample(torch.Generator().manual_seed(module.seed))
        assert scale == pytest.approx(1.0 / float(raw.std()), rel=1e-6)
        assert float(vae.normalize_latents(raw).std()) == pytest.approx(1.0, rel=1e-5)
        z = vae.encode_latents(torch.stack([b["image"] for b in image_batches(8, seed=1)]))
    assert 0.5 < float(z.std()) < 2.0  # other images: near unit spread


def test_a_per_channel_fit_centres_every_channel_at_unit_spread_and_survives_the_vae_checkpoint(tmp_path):
    """vae_stage.latent_normalization=per_channel: each channel's mean and std of the posterior samples, over batches
    of different sizes (buckets), become latent_mean / latent_std; the scalar scale becomes 1."""
    torch.manual_seed(0)
    vae = tiny_vae()
    with torch.no_grad():  # channels apart in mean and spread, as a trained small VAE's are
        vae.quant_conv.bias[:4] += torch.tensor([0.8, -0.5, 0.0, 1.2])
        vae.quant_conv.weight[:4] *= torch.tensor([0.5, 1.0, 2.0, 3.0]).view(4, 1, 1, 1)
        vae.quant_conv.bias[4:] = -6.0  # log-variances: a narrow posterior, so the means' spread shows
    module = AutoencoderModule(vae, seed=7)
    batches = [torch.stack([b["image"] for b in image_batches(n, seed=n)]) for n in (8, 4)]
    fitted = module.fit_latent_normalization(batches, per_channel=True)
    assert fitted.startswith("latent mean ") and " std " in fitted
    assert vae.config["scale_factor"] == 1.0 and vae.config["shift_factor"] is None
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        raw = torch.cat([vae.encode(b).sample(generator) for b in batches])
    by_channel = raw.transpose(0, 1).flatten(1)
    assert vae.config["latent_mean"] == pytest.approx(by_channel.mean(1).tolist(), abs=1e-6)
    assert vae.config["latent_std"] == pytest.approx(by_channel.std(1).tolist(), rel=1e-6)
    assert max(vae.config["latent_std"]) / min(vae.config["latent_std"]) > 2  # the channels did differ
    normalized = vae.normalize_latents(raw)
    torch.testing.assert_close(normalized.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized.std((0, 2, 3)), torch.ones(4), atol=1e-5, rtol=0)
    save_autoencoder(tmp_path / "vae.ckpt", vae)
    loaded = load_autoencoder(tmp_path / "vae.ckpt")
    torch.testing.assert_close(loaded.normalize_latents(raw), normalized)
    torch.testing.assert_close(loaded.denormalize_latents(normalized), raw, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="latent_normalization=per_channel"):
        module.fit_latent_normalization(batches)  # a scalar fit would drop the per-channel std silently


def test_a_scalar_fit_with_per_channel_means_scales_the_centred_latents_to_unit_spread():
    """A VAE that subtracts a per-channel ``latent_mean`` (no ``latent_std``): the scalar fit takes the spread of the
    latents as normalised, after the means come off, not of the raw ones (their means' spread inflated it)."""
    from ldm.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    mean = [2.0, -2.0, 1.0, -1.0]
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=1.0, latent_mean=mean)
    with torch.no_grad():
        vae.quant_conv.bias[:4] += torch.tensor(mean)
        vae.quant_conv.bias[4:] = -4.0
    module = AutoencoderModule(vae, seed=0)
    images = torch.stack([b["image"] for b in image_batches(8)])
    module.fit_latent_normalization(images)
    assert vae.config["latent_mean"] == mean
    with torch.no_grad():
        raw = vae.encode(images).sample(torch.Generator().manual_seed(0))
    assert float(vae.normalize_latents(raw).std()) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_fit_on_non_finite_latents_is_an_error_not_a_nan_normalisation(per_channel):
    """A VAE that encodes to inf or NaN fitted a NaN scale (or inf means, NaN stds) without a word: vae.ckpt then
    carried it, and every latent diffusion trained on was NaN."""
    vae = tiny_vae()
    with torch.no_grad():
        vae.quant_conv.bias[:4] = float("inf")
    before = dict(vae.config)
    with pytest.raises(ValueError, match="NaN or inf latents"):
        AutoencoderModule(vae).fit_latent_normalization(torch.zeros(2, 3, 16, 16), per_channel=per_channel)
    assert vae.config == before


def test_scale_equivariance_adds_the_pooled_latents_reconstruction_error(tmp_path):
    """vae_stage.scale_equivariance: the loss gains w x the error of the 2x-pooled latent sample, decoded, against the
    2x-pooled image, computed here by hand from the first step's weights and posterior sample."""
    torch.manual_seed(0)
    vae = tiny_vae()
    start = copy.deepcopy(vae)
    module = AutoencoderModule(vae, lr=1e-3, rec_loss="l2", kl_weight=1e-3, scale_equivariance=0.5, seed=7)
    logged = {}
    module.log = lambda name, value, **kw: logged.setdefault(name, value.detach().clone())  # the first step's
    images = image_batches(8)
    trainer(1, tmp_path).fit(module, DataLoader(images, batch_size=8, collate_fn=collate))
    x = torch.stack([b["image"] for b in images])
    with torch.no_grad():
        posterior = start.encode(x)
        z = posterior.sample(torch.Generator().manual_seed(7))
        rec = F.mse_loss(start.decode(z), x)
        pooled = F.mse_loss(start.decode(F.avg_pool2d(z, 2)), F.avg_pool2d(x, 2))
    assert torch.allclose(logged["train/se_loss"], pooled, rtol=1e-4)
    assert torch.allclose(logged["train/rec_loss"], rec, rtol=1e-4)
    assert torch.allclose(logged["train/loss"], rec + 1e-3 * logged["train/kl"] + 0.5 * pooled, rtol=1e-4)
    with pytest.raises(ValueError, match="needs even latent sizes, got \\(3, 3\\)"):
        module._scale_equivariance_loss(torch.zeros(1, 3, 6, 6), torch.zeros(1, 4, 3, 3))
    with pytest.raises(ValueError, match="scale_equivariance must be a weight >= 0"):
        AutoencoderModule(tiny_vae(), scale_equivariance=-0.1)


@pytest.mark.parametrize("capped", [False, True])
def test_the_adaptive_gan_weight_is_compvis_for_a_per_pixel_mean_loss(tmp_path, monkeypatch, capped):
    """CompVis' LPIPSWithDiscriminator sums the reconstruction over a sample's C x H x W values and caps the GAN
    weight at 1e4; ldm averages, so its weight is CompVis' divided by C x H x W, the cap included. ``capped``: a
    discriminator whose last layer is zero has no GAN gradient, so the weight sits at the cap."""
    import ldm.lightning.autoencoder_module as autoencoder_module

    size = 3 * 16 * 16  # image_batches' RGB 16 x 16 images
    real, seen = autoencoder_module.adaptive_gan_weight, []

    def spy(nll, g_loss, last_layer, **kwargs):
        ours = real(nll, g_loss, last_layer, **kwargs)
        summed = torch.autograd.grad(nll * size, last_layer, retain_graph=True)[0]  # CompVis' loss, pixel-summed
        gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        compvis = torch.clamp(summed.norm() / (gan.norm() + 1e-4), 0.0, 1e4)
        seen.append((float(ours), float(compvis) / size))
        return ours

    monkeypatch.setattr(autoencoder_module, "adaptive_gan_weight", spy)
    torch.manual_seed(0)
    module = AutoencoderModule(tiny_vae(), lr=1e-3, disc_start=0, disc_layers=2, disc_channels=8)
    if capped:
        nn.init.zeros_(module.discriminator.main[-1].weight)
    trainer(1, tmp_path).fit(module, DataLoader(image_batches(), batch_size=8, collate_fn=collate))
    assert len(seen) == 1
    for ours, compvis in seen:
        assert ours == pytest.approx(compvis, rel=1e-4)
    if capped:
        assert seen[0][0] == pytest.approx(1e4 / size)
    else:
        assert all(ours < 1e4 / size for ours, _ in seen)


def test_a_gan_batch_is_one_training_step(tmp_path):
    """With the discriminator on, a batch still counts one step (Lightning counts each optimizer step of manual
    optimization): max_steps, disc_start and the learning-rate schedule are in batches."""
    module = AutoencoderModule(tiny_vae(), lr=1e-3, disc_start=2, disc_layers=2, disc_channels=8,
                               lr_schedule="cosine", max_steps=6)
    batches = []
    module.on_train_batch_start = lambda batch, batch_idx: batches.append(batch_idx)
    fitted = trainer(6, tmp_path)
    fitted.fit(module, DataLoader(image_batches(64), batch_size=8, collate_fn=collate))
    assert fitted.global_step == 6 and batches == list(range(6))
    opt_ae, opt_d = fitted.optimizers
    assert int(opt_ae.state[next(module.vae.parameters())]["step"]) == 6
    assert int(opt_d.state[next(module.discriminator.parameters())]["step"]) == 4  # batches 2..5
    assert [c.scheduler.last_epoch for c in fitted.lr_scheduler_configs] == [6, 6]
    assert opt_ae.param_groups[0]["lr"] == 0.0  # the cosine schedule ends with the last batch


def test_ddp_leaves_the_patchgan_to_the_module_on_several_ranks_only():
    """On several DDP ranks, DDP ignores the discriminator's parameters and buffers (its reducer takes one backward
    per forward; a GAN batch has two) and nothing of the autoencoder; on one device nothing is ignored."""
    from lightning.pytorch.strategies import DDPStrategy

    gan = AutoencoderModule(tiny_vae(), disc_start=10, disc_layers=2, disc_channels=8)
    gan._trainer = SimpleNamespace(world_size=1, strategy=DDPStrategy(), global_rank=0)
    gan.setup("fit")
    assert not hasattr(gan, "_ddp_params_and_buffers_to_ignore")
    gan._trainer = SimpleNamespace(world_size=2, strategy=DDPStrategy(), global_rank=0)
    gan.setup("fit")
    disc = {f"discriminator.{n}" for n, _ in [*gan.discriminator.named_parameters(),
                                              *gan.discriminator.named_buffers()]}
    assert set(gan._ddp_params_and_buffers_to_ignore) == disc and any("running_var" in n for n in disc)


def _average_rank(rank: int) -> dict:
    module = AutoencoderModule(tiny_vae(), disc_start=0, disc_layers=2, disc_channels=8)
    module._trainer = SimpleNamespace(world_size=2)
    d = module.discriminator
    for i, p in enumerate(d.parameters()):
        p.grad = torch.full_like(p, (rank + 1.0) * (i + 1))
    for b in d.buffers():
        b.fill_(2.0 * rank if b.is_floating_point() else 5 + rank)
    module._average_discriminator()
    # as lists: torch's queue reductions would share the tensors' memory with a process that is about to end
    return {"grads": [p.grad.tolist() for p in d.parameters()], "buffers": [b.tolist() for b in d.buffers()]}


def _broadcast_rank(rank: int) -> list:
    torch.manual_seed(rank)  # a different discriminator on each rank
    module = AutoencoderModule(tiny_vae(), disc_start=0, disc_layers=2, disc_channels=8)
    with torch.no_grad():
        for b in module.discriminator.buffers():
            b.fill_(rank + 1)
    module._broadcast_discriminator()
    return [t.tolist() for t in module.discriminator.state_dict().values()]


def test_the_discriminator_gradients_and_statistics_are_averaged_over_the_ranks(tmp_path):
    """What DDP does for the autoencoder, done by hand for the discriminator: each gradient and running statistic
    becomes the ranks' mean, the same on both; the integer batch counters stay as they are."""
    from tests.two_ranks import on_two_ranks

    out = on_two_ranks(_average_rank, tmp_path / "store")
    r0, r1 = out[0], out[1]  # by rank: the results arrive in either order
    assert len(r0["grads"]) > 4
    for i, (g0, g1) in enumerate(zip(r0["grads"], r1["grads"], strict=True)):
        g0, g1 = torch.tensor(g0), torch.tensor(g1)
        assert torch.equal(g0, g1) and torch.equal(g0, torch.full_like(g0, 1.5 * (i + 1)))
    for b0, b1 in zip(r0["buffers"], r1["buffers"], strict=True):
        b0, b1 = torch.tensor(b0), torch.tensor(b1)
        if b0.is_floating_point():
            assert torch.equal(b0, b1) and torch.equal(b0, torch.full_like(b0, 1.0))
        else:  # num_batches_tracked: each rank's own
            assert int(b0) == 5 and int(b1) == 6


def test_every_rank_starts_from_rank_0s_discriminator(tmp_path):
    """DDP ignores the discriminator, so it does not broadcast it when it wraps the module: the module does."""
    from tests.two_ranks import on_two_ranks

    out = on_two_ranks(_broadcast_rank, tmp_path / "store")
    torch.manual_seed(0)
    rank0 = AutoencoderModule(tiny_vae(), disc_start=0, disc_layers=2, disc_channels=8).discriminator
    with torch.no_grad():
        for b in rank0.buffers():
            b.fill_(1)
    assert out[0] == out[1] == [t.tolist() for t in rank0.state_dict().values()]


def test_images_too_small_for_the_patchgan_fail_with_the_fix(tmp_path):
    module = AutoencoderModule(tiny_vae(), lr=1e-3, disc_start=0, disc_layers=3, disc_channels=8)  # needs 24 px
    with pytest.raises(ValueError, match=r"3 layers need images of at least 24 px, got \(16, 16\): lower "
                                         r"vae_stage.disc_layers"):
        trainer(1, tmp_path).fit(module, DataLoader(image_batches(8), batch_size=8, collate_fn=collate))


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_the_autoencoder_stage_logs_the_unscaled_norm_and_clips_its_gradients(tmp_path, precision):
    """``train/grad_norm`` is the norm of the gradients the optimizer steps with, after fp16's scaler unscaled them
    (it read the loss scale times that), and ``gradient_clip_val`` clips them (Lightning clips only in automatic
    optimisation, so the stage's clipping used to be dropped)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from ldm.lightning.optim import grad_norm

    stepped: list[float] = []
    module = AutoencoderModule(tiny_vae(), lr=1e-4, max_steps=1, gradient_clip_val=1e-3)
    original = torch.optim.Adam.step

    def step(self, closure=None, **kwargs):  # the update reads these gradients
        if closure is not None:  # Lightning's hooks (and the clipping) run in the closure
            with torch.enable_grad():
                closure()
        stepped.append(float(grad_norm(p for g in self.param_groups for p in g["params"])))
        return original(self, **kwargs)

    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))] \
        if precision == "16-mixed" else []
    t = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path, plugins=plugins)
    with mock.patch.object(torch.optim.Adam, "step", step):
        t.fit(module, DataLoader(image_batches(4), batch_size=4, collate_fn=collate))
    logged = float(module.step_log.latest["train/grad_norm"])
    assert 1e-3 < logged < 100  # the true norm (under fp16 it read ~1,000 times that)
    assert stepped == [pytest.approx(1e-3, rel=1e-3)]  # clipped to gradient_clip_val
    with pytest.raises(ValueError, match="gradient_clip_val must be > 0"):
        AutoencoderModule(tiny_vae(), gradient_clip_val=0.0)


def test_an_autoencoder_step_reads_no_value_back_from_the_device(tmp_path):
    """The VAE stage's step (forward, losses, the generator's and discriminator's backward, the non-finite test,
    fused Adam, logging and Lightning's collection of the logged values) makes no host read of a device value."""
    module = AutoencoderModule(tiny_vae(), lr=1e-3, disc_start=2, disc_layers=2, disc_channels=8)
    numbers = logs_of_python_numbers(module)
    watch = WatchSteps()
    watched = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[watch, Throughput()])
    watched.fit(module, DataLoader(image_batches(64), batch_size=8, collate_fn=collate))
    assert module.nonfinite.on_device and watched.global_step == 5
    assert all(g["fused"] for opt in watched.optimizers for g in opt.param_groups)
    assert watch.mode.reads == 0, f"{watch.mode.reads} reads of device values in 4 training steps"
    assert numbers == [], f"logged as Python numbers: {sorted(set(numbers))}"


def test_a_non_finite_autoencoder_step_stops_the_run_and_changes_no_weight(tmp_path):
    """A NaN batch at step 1: fused Adam skips the generator's and the discriminator's updates on the device (each
    tested on its own gradients), and the run stops when the count is read, two steps later, naming the step and
    what to change."""
    torch.manual_seed(0)
    module = AutoencoderModule(tiny_vae(), lr=1e-3, disc_start=0, disc_layers=2, disc_channels=8)
    data = image_batches(64)
    for item in data[8:16]:  # the second batch of 8
        item["image"] = item["image"] * float("nan")
    weights = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights.append([p.detach().clone() for p in (*pl_module.vae.parameters(),
                                                         *pl_module.discriminator.parameters())])

    stopped = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Record()])
    with pytest.raises(FloatingPointError, match=r"gradients are not finite at step 1 .*vae_stage\.lr"):
        stopped.fit(module, DataLoader(data, batch_size=8, collate_fn=collate))
    assert len(weights) == 3 and stopped.global_step == 3
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[0], strict=True))  # step 1 changed nothing
    assert any(not torch.equal(a, b) for a, b in zip(weights[2], weights[1], strict=True))
    assert all(torch.isfinite(w).all() for w in weights[2])

    # non-finite gradients in the discriminator only (a hook on one of its weights, at its backward of step 1): its
    # update is skipped, the generator's goes on, and the run stops as well
    torch.manual_seed(0)
    module = AutoencoderModule(tiny_vae(), lr=1e-3, disc_start=0, disc_layers=2, disc_channels=8)
    first = next(module.discriminator.parameters())
    backwards = []
    first.register_hook(lambda g: g * float("nan") if len(backwards) == 4 else g)  # 2 backwards per batch
    module.manual_backward = (lambda backward: lambda loss: (backwards.append(1), backward(loss)))(
        module.manual_backward)
    weights.clear()
    stopped = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Record()])
    with pytest.raises(FloatingPointError, match=r"gradients are not finite at step 1 "):
        stopped.fit(module, DataLoader(image_batches(64), batch_size=8, collate_fn=collate))
    n_vae = len(list(module.vae.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(weights[1][:n_vae], weights[0][:n_vae], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights[1][n_vae:], weights[0][n_vae:], strict=True))


def test_perceptual_loss_needs_local_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="perceptual_weight=0"):
        AutoencoderModule(tiny_vae(), perceptual_weight=1.0, perceptual_weights=str(tmp_path / "missing.pth"))
    from ldm.autoencoder.losses import PerceptualLoss

    path = tmp_path / "lpips.pth"
    PerceptualLoss.save_random(path)
    loss = PerceptualLoss(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(loss(x, x), torch.zeros(2), atol=1e-6)
    assert (loss(x, -x) > 0).all()


def test_the_perceptual_loss_reads_the_published_files_and_equals_lpips(tmp_path):
    """torchvision's whole VGG16 state dict (its classifier ignored) with LPIPS v0.1's ``vgg.pth`` as published
    (``lin{i}.model.1.weight``; the copy torchmetrics bundles), given as a list: the distance equals torchmetrics'
    LPIPS on the same weights (its VGG randomly initialised: nothing downloaded)."""
    from pathlib import Path

    import torchmetrics.functional.image.lpips as tm_lpips
    from torchvision.models import vgg16

    from ldm.autoencoder.losses import PerceptualLoss

    torch.manual_seed(0)
    ref = tm_lpips._LPIPS(pretrained=True, net="vgg", pnet_rand=True).eval()
    lpips_file = Path(tm_lpips.__file__).parent / "lpips_models" / "vgg.pth"
    assert any(k.endswith(".model.1.weight") for k in torch.load(lpips_file, map_location="cpu"))
    whole = vgg16(weights=None)
    for i in range(1, 6):  # the reference's VGG layers, under torchvision's names (its slices keep the indices)
        for name, value in getattr(ref.net, f"slice{i}").state_dict().items():
            whole.features.state_dict()[name].copy_(value)
    torch.save(whole.state_dict(), tmp_path / "vgg16.pth")
    ours = PerceptualLoss([tmp_path / "vgg16.pth", lpips_file])
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), ref(x, y).flatten(), rtol=1e-5, atol=0)


def test_guide_snapshot_holds_the_ema_weights_of_its_step_and_drives_autoguidance(tmp_path):
    torch.manual_seed(0)
    unet, vae, text = tiny_unet(), tiny_vae(), HashTextEncoder()
    sampling = {"image_size": 16, "guidance_scale": 3.0, "num_inference_steps": 4, "autoguidance_scale": 2.0}
    module = diffusion_module(unet, text, vae, schedule={"schedule": "cosine"}, ema_decay=0.9, max_steps=6,
                                   optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), sampling=sampling,
                                   guide_snapshot_step=0.5)  # half of max_steps: step 3
    assert module.guide_snapshot_step == 3 and not module.has_guide()
    assert not any(p.requires_grad for p in module.guide_unet.parameters())
    before = module.generate(["a red square"], generator=torch.Generator().manual_seed(0))  # no guide yet: plain

    class Record(L.Callback):  # what the EMA and the text encoder hold after each optimizer step
        seen: dict = {}

        def on_train_batch_end(self, trainer, pl_module, *args):
            Record.seen[trainer.global_step] = (pl_module.ema.averaged_state_dict(),
                                                {k: v.clone() for k, v in pl_module.text_encoder.state_dict().items()})

    t = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[Record()],
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    t.fit(module, DataLoader(image_batches(), batch_size=8, collate_fn=collate, shuffle=True))
    assert module.has_guide() and module.guide_text_encoder is not None
    ema3, text3 = Record.seen[3]
    guide = dict(module.guide_unet.named_parameters())
    for name, value in ema3.items():
        torch.testing.assert_close(guide[name], value, rtol=0, atol=0)
    for name, value in module.guide_text_encoder.state_dict().items():
        torch.testing.assert_close(value, text3[name], rtol=0, atol=0)
    assert not torch.equal(guide["time_embed.0.weight"], module.ema.averaged_state_dict()["time_embed.0.weight"])
    prompts, g = ["a red square", "a blue square"], lambda: torch.Generator().manual_seed(0)
    auto = module.generate(prompts, generator=g())
    plain = module.generate(prompts, generator=g(), autoguidance_scale=1.0)
    assert not torch.allclose(auto, plain) and before.shape == (1, 3, 16, 16)
    state = module.state_dict()
    assert state["guide_taken"] and any(k.startswith("guide_unet.") for k in state)


def test_guide_snapshot_settings_are_checked_at_construction():
    net = tiny_unet()
    with pytest.raises(ValueError, match=r"guide_snapshot_step=11 must lie in \[1, max_steps=10\]"):
        diffusion_module(net, None, None, ema_decay=None, max_steps=10, guide_snapshot_step=11)
    one = diffusion_module(net, None, None, ema_decay=None, max_steps=1, guide_snapshot_step=0.1)
    assert one.guide_snapshot_step == 1  # a fraction rounds to at least one step
    with pytest.raises(ValueError, match="a step count"):
        diffusion_module(net, None, None, ema_decay=None, max_steps=10, guide_snapshot_step=2.5)
    with pytest.raises(ValueError, match="needs a guide model: set ldm_stage.guide_snapshot_step"):
        diffusion_module(net, None, None, ema_decay=None, sampling={"autoguidance_scale": 2.0})
    with pytest.raises(ValueError, match="autoguidance_scale must be a finite number >= 1"):
        diffusion_module(net, None, None, ema_decay=None, sampling={"autoguidance_scale": 0.0})
    frozen_text = HashTextEncoder().requires_grad_(False)
    m = diffusion_module(net, frozen_text, None, ema_decay=None, max_steps=10, guide_snapshot_step=4)
    assert m.guide_text_encoder is None and m.guide_unet is not None  # a frozen encoder is shared, not copied
    from lightning.pytorch.strategies import FSDPStrategy

    m._trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), global_rank=0)
    with pytest.raises(ValueError, match="not supported under trainer=fsdp"):  # the copy would land in shards
        m.setup("fit")


def test_fused_optimizer_under_bf16_mixed_is_clipped_not_refused(tmp_path):
    """Lightning refuses gradient clipping with any fused optimizer under AMP; bf16-mixed has no loss scaler, so the
    module clips itself: the optimizer steps on gradients whose norm is the clip value."""
    norms = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            loss = closure() if closure is not None else None  # backward, then Lightning's clipping hook
            norms.append(float(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"] if p.grad is not None]))))
            super().step()
            return loss

    torch.manual_seed(0)
    module = diffusion_module(tiny_unet(), HashTextEncoder(), tiny_vae(), ema_decay=None, max_steps=3,
                                   optimizer=lambda p: RecordingAdamW(p, lr=1e-3, fused=True))
    loader = DataLoader(image_batches(), batch_size=8, collate_fn=collate)
    L.Trainer(max_steps=3, accelerator="cpu", precision="bf16-mixed", gradient_clip_val=1e-3, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path).fit(module, loader)
    assert len(norms) == 3
    assert all(n == pytest.approx(1e-3, rel=1e-3) for n in norms), norms  # the raw norms are far above 1e-3


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_clipping_reuses_the_logged_gradient_norm(tmp_path, monkeypatch, precision):
    """The gradient norm logged before the optimizer step is the one the clipping divides by: one pass over the
    gradients per step instead of two, and the same weights as torch's clip_grad_norm_ gives."""

    def train(module_cls, count_norms):
        torch.manual_seed(0)
        module = diffusion_module(tiny_unet(), HashTextEncoder(), tiny_vae(), ema_decay=None, max_steps=3,
                                  optimizer=fused_adamw)
        module.__class__ = module_cls
        passes = []
        real = torch._foreach_norm
        if count_norms:
            monkeypatch.setattr(torch, "_foreach_norm", lambda *a, **k: passes.append(1) or real(*a, **k))
        loader = DataLoader(image_batches(), batch_size=8, collate_fn=collate)
        L.Trainer(max_steps=3, accelerator="cpu", precision=precision, gradient_clip_val=1e-3, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=tmp_path).fit(module, loader)
        monkeypatch.setattr(torch, "_foreach_norm", real)
        return module, len(passes)

    base = type(diffusion_module(tiny_unet(), HashTextEncoder(), tiny_vae(), ema_decay=None, max_steps=3))

    class TorchClipping(base):  # the reference: torch's own clip_grad_norm_, which computes the norm itself
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self._clip_norm = None
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            nn.utils.clip_grad_norm_(params, gradient_clip_val)

    ours, passes = train(base, count_norms=True)
    reference, _ = train(TorchClipping, count_norms=False)
    assert passes == 3  # one norm per step: the logged one
    for (name, a), b in zip(ours.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_the_progress_bar_shows_the_modules_keys_read_at_its_refresh(tmp_path):
    """The loss is not a prog_bar metric (Lightning would read it back after every step); the bar reads the module's
    progress_bar_keys when it refreshes."""
    from ldm.lightning.console import StepProgressBar
    from ldm.lightning.diffusion_module import LatentDiffusionModule

    class Tiny(L.LightningModule):
        progress_bar_keys = LatentDiffusionModule.progress_bar_keys

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))

        def training_step(self, batch, batch_idx):
            loss = (self.w - batch).square().sum()
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    bar, module = StepProgressBar(refresh_rate=2), Tiny()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[bar])
    trainer.fit(module, DataLoader(torch.ones(8, 2), batch_size=2))
    assert "train/loss" not in trainer.progress_bar_metrics
    shown = bar.get_metrics(trainer, module)
    assert shown["train/loss"] == float(trainer.callback_metrics["train/loss"]) and "v_num" not in shown


def test_lora_and_autoguidance_are_refused_under_fsdp_before_training():
    """Under FSDP the LoRA adapters would share flat parameters with the frozen base and be exported from one
    rank's shard; the autoguidance snapshot would be copied into sharded weights. Both stop at setup, naming DDP."""
    from lightning.pytorch.strategies import FSDPStrategy

    from ldm.lora import add_lora

    fsdp = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), global_rank=0)
    lora = diffusion_module(add_lora(tiny_unet(), rank=2), ema_decay=None)
    lora._trainer = fsdp
    with pytest.raises(ValueError, match=r"LoRA .* not supported under trainer=fsdp.*Use trainer=ddp"):
        lora.setup("fit")
    guided = diffusion_module(tiny_unet(), guide_snapshot_step=1)
    guided._trainer = fsdp
    with pytest.raises(ValueError, match=r"autoguidance\) is not supported under trainer=fsdp"):
        guided.setup("fit")
    lora._trainer = SimpleNamespace(strategy=object(), global_rank=0)  # any other strategy: no refusal
    lora.setup("fit")


def test_the_vae_stage_trainer_leaves_gradient_accumulation_to_the_ldm_stage(tmp_path):
    """``trainer.accumulate_grad_batches`` is shared by the stages; Lightning refuses it under manual optimisation,
    so the vae stage's trainer steps every batch (and trains) instead of failing when its fit starts."""
    from omegaconf import OmegaConf

    from ldm.lightning import stages

    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": 1, "accumulate_grad_batches": 2,
                                        "gradient_clip_val": 1.0, "enable_progress_bar": False,
                                        "enable_checkpointing": False}})
    vae_trainer = stages.make_trainer(cfg, tmp_path, max_steps=2, callbacks=[], logger=False, manual=True)
    assert vae_trainer.accumulate_grad_batches == 1 and vae_trainer.gradient_clip_val is None
    vae_trainer.fit(AutoencoderModule(tiny_vae(), lr=1e-3), DataLoader(image_batches(), batch_size=4,
                                                                      collate_fn=collate))
    assert vae_trainer.global_step == 2
    ldm_trainer = stages.make_trainer(cfg, tmp_path, max_steps=2, callbacks=[], logger=False)
    assert ldm_trainer.accumulate_grad_batches == 2


def test_the_latent_scale_is_fitted_without_dropout_and_the_mode_is_kept():
    """Lightning leaves the module training after fit: the fit measures the eval-mode posterior (no dropout) that
    the latent cache and training encode with, and leaves the mode as it found it."""
    torch.manual_seed(0)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, scale_factor=1.0,
                        dropout=0.5)
    module = AutoencoderModule(vae, seed=3)
    images = torch.stack([b["image"] for b in image_batches(8)])
    module.train()
    module.fit_latent_normalization(images)
    assert vae.training
    with torch.no_grad():
        vae.eval()
        raw = vae.encode(images).sample(torch.Generator().manual_seed(3))
    assert vae.config["scale_factor"] == pytest.approx(1.0 / float(raw.std()), rel=1e-6)


@pytest.mark.parametrize("disc_start", [0, 1])
def test_throughput_counts_the_whole_gan_step_and_again_when_the_gan_starts(tmp_path, disc_start):
    """The GAN VAE steps two optimizers a batch: the discriminator's forwards and backward count, and a count made
    before ``disc_start`` is replaced by one of a GAN step."""
    from ldm.lightning.flops import flop_counter_mode

    class EveryStep(L.Callback):  # the oracle: every step's FLOPs, counted whole
        flops: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.counter = flop_counter_mode()
            self.counter.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.counter.__exit__(None, None, None)
            self.flops.append(float(self.counter.get_total_flops()))

    torch.manual_seed(0)
    module = AutoencoderModule(tiny_vae(), lr=1e-3, disc_start=disc_start, disc_layers=2, disc_channels=16)
    throughput, oracle = Throughput(), EveryStep()
    oracle.flops = []
    counted = []
    module.on_train_batch_end = lambda *args: counted.append(throughput.flops_per_step)
    fit = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    callbacks=[throughput, oracle])
    fit.fit(module, DataLoader(image_batches(), batch_size=4, collate_fn=collate))
    assert oracle.flops[0] < oracle.flops[-1] if disc_start else oracle.flops[0] == oracle.flops[-1]
    assert counted[0] == pytest.approx(oracle.flops[0], rel=1e-6)  # the first step, as it ran
    assert counted[-1] == pytest.approx(oracle.flops[-1], rel=1e-6)  # a GAN step, discriminator included
