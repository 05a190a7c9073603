"""The UNet: shapes, SD module names, gradients, checkpointing, backends and input errors (tiny configs)."""

from __future__ import annotations

import pytest
import torch

from ldm.nn.embeddings import timestep_embedding
from ldm.unet import UNet

TINY = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(1, 2), num_heads=2, context_dim=32)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter random values (the zero-initialised output convs would block gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs(batch: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, size, size, generator=g), torch.tensor([10, 900][:batch]), torch.randn(
        batch, 5, 32, generator=g)


def test_shapes_and_scalar_timestep() -> None:
    unet = UNet(**TINY)
    _randomize(unet)
    x, t, ctx = _inputs()
    out = unet(x, t, ctx)
    assert out.shape == x.shape
    torch.testing.assert_close(unet(x, 10, ctx)[0], unet(x, torch.tensor([10, 10]), ctx)[0])


def test_sd_module_names() -> None:
    unet = UNet(**TINY, num_classes=3)
    keys = set(unet.state_dict())
    for k in ["time_embed.0.weight", "time_embed.2.weight", "label_emb.weight", "input_blocks.0.0.weight",
              "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
              "input_blocks.1.0.out_layers.3.weight", "input_blocks.1.1.proj_in.weight",
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
              "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", "input_blocks.2.0.op.weight",
              "input_blocks.3.0.skip_connection.weight", "middle_block.0.in_layers.2.weight",
              "middle_block.1.norm.weight", "middle_block.2.out_layers.3.bias",
              "output_blocks.0.0.skip_connection.weight",
              "output_blocks.1.2.conv.weight", "output_blocks.3.1.proj_out.weight", "out.0.weight", "out.2.weight"]:
        assert k in keys, k
    assert len(unet.input_blocks) == 4 and len(unet.output_blocks) == 4


def test_unreached_attention_resolutions_and_wrong_timesteps_are_refused() -> None:
    for bad in ((4,), (8, 2), (3,)):  # TINY has two levels: factors 1 and 2
        with pytest.raises(ValueError, match=r"attention_resolutions are downsample factors, one of \[1, 2\]"):
            UNet(**{**TINY, "attention_resolutions": bad})
    for depth in (0, -1, 1.5, True):  # 0 built attention levels with no transformer block in them
        with pytest.raises(ValueError, match=r"transformer_depth must be an integer >= 1 .*attention_resolutions=\[\]"):
            UNet(**{**TINY, "transformer_depth": depth})
    unet = UNet(**TINY).eval()
    x, context = torch.randn(4, 4, 8, 8), torch.randn(4, 5, 32)
    with pytest.raises(ValueError, match=r"one timestep per input \(4\), got shape \(2,\)"):
        unet(x, torch.tensor([10, 900]), context)  # it used to be tiled to 10, 900, 10, 900
    with torch.no_grad():
        torch.testing.assert_close(unet(x, torch.tensor([10]), context), unet(x, torch.full((4,), 10), context))


def test_a_first_level_wider_than_model_channels_runs() -> None:
    """channel_mult[0] != 1 (CompVis' layout: the first ResBlock widens model_channels): the output layers read the
    first level's width. They read model_channels, and the first forward failed."""
    unet = UNet(**{**TINY, "channel_mult": (2, 4)})
    _randomize(unet)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 32)
    out = unet(x, t, context)
    assert out.shape == x.shape and unet.out[2].in_channels == 64
    out.square().mean().backward()
    assert unet.input_blocks[0][0].weight.grad.abs().max() > 0


def test_attention_resolutions_are_downsample_factors() -> None:
    keys = set(UNet(**{**TINY, "attention_resolutions": (2,)}).state_dict())
    assert "input_blocks.1.1.norm.weight" not in keys  # level 0 (factor 1): no attention
    assert "input_blocks.3.1.norm.weight" in keys  # level 1 (factor 2)
    assert "output_blocks.1.2.conv.weight" in keys  # upsample after the attention
    keys = set(UNet(**{**TINY, "attention_resolutions": (1,)}).state_dict())
    assert "input_blocks.1.1.norm.weight" in keys and "input_blocks.3.1.norm.weight" not in keys
    assert "output_blocks.1.1.conv.weight" in keys  # upsample at index 1 without attention


def test_head_arguments() -> None:
    unet = UNet(**{**TINY, "num_heads": -1, "num_head_channels": 16, "use_linear_proj": True})
    attn = unet.middle_block[1].transformer_blocks[0].attn1
    assert (attn.heads, attn.dim_head) == (4, 16)
    assert unet.middle_block[1].proj_in.weight.ndim == 2
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNet(**{**TINY, "num_head_channels": 16})
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNet(**{**TINY, "num_heads": -1})


def test_gradient_flows_to_all_parameters() -> None:
    unet = UNet(**TINY, num_classes=3, use_scale_shift_norm=True)
    _randomize(unet)
    x, t, ctx = _inputs()
    unet(x, t, ctx, y=torch.tensor([0, 2])).square().mean().backward()
    dead = [n for n, p in unet.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_gradient_checkpointing_gives_equal_gradients() -> None:
    torch.manual_seed(0)
    plain = UNet(**TINY, dropout=0.1)
    _randomize(plain)
    ckpt = UNet(**TINY, dropout=0.1, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = _inputs()
    grads = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(123)  # same dropout masks (checkpoint replays the RNG state)
        model(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_sdpa_and_math_backends_agree() -> None:
    a = UNet(**TINY, attention_backend="sdpa")
    _randomize(a)
    b = UNet(**TINY, attention_backend="math")
    b.load_state_dict(a.state_dict())
    x, t, ctx = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, ctx), b(x, t, ctx), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_forward_is_finite() -> None:
    unet = UNet(**TINY, attention_backend="math")
    _randomize(unet)
    x, t, ctx = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, ctx)
    assert torch.isfinite(out).all()


def test_class_conditioning() -> None:
    unet = UNet(**TINY, num_classes=3)
    _randomize(unet)
    x, t, ctx = _inputs()
    assert not torch.allclose(unet(x, t, ctx, torch.tensor([0, 0])), unet(x, t, ctx, torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="class-conditional.*pass labels y"):
        unet(x, t, ctx)
    with pytest.raises(ValueError, match="num_classes=None"):
        UNet(**TINY)(x, t, ctx, y=torch.tensor([0, 1]))


def test_input_errors() -> None:
    unet = UNet(**{**TINY, "channel_mult": (1, 2, 2)})
    x, t, ctx = _inputs(size=16)
    with pytest.raises(ValueError, match=r"context must be \[B, L, 32\].*got \(2, 5, 16\)"):
        unet(x, t, torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="conditioned.*pass context"):
        unet(x, t)
    with pytest.raises(ValueError, match=r"x must be \[B, 4, H, W\]"):
        unet(torch.randn(2, 3, 16, 16), t, ctx)
    with pytest.raises(ValueError, match="context batch 1 does not match x batch 2"):
        unet(x, t, ctx[:1])
    with pytest.raises(ValueError, match="allowed values"):
        UNet(**TINY, attention_backend="flash")


@pytest.mark.parametrize("config, groups", [
    (dict(), 2),  # cross-attention at the first level: the ResBlock and the self-attention before it are shared
    (dict(attention_resolutions=()), 2),  # only the middle block's: the ResBlock after it gets the grouped embedding
    (dict(attention_resolutions=(2,), transformer_depth=2, use_linear_proj=True), 3),
    (dict(num_classes=3), 2),
    (dict(in_channels=9), 2),  # an inpainting UNet: concat is shared like x
    (dict(pool_context=True), 2),  # every layer sees the context: nothing is shared
])
def test_contexts_per_input_equals_the_repeated_batch_and_runs_the_shared_layers_once(config: dict,
                                                                                     groups: int) -> None:
    """unet(x, t, [c_1; ...; c_k], contexts_per_input=k) is unet on x, t, y and concat repeated k times, and the
    layers before the first cross-attention (the input convolution, the first self-attention) see B rows, not k*B."""
    unet = UNet(**{**TINY, **config}).eval()
    _randomize(unet)
    batch = 3
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(batch, 4, 16, 16, generator=g), torch.randn(groups * batch, 5, 32, generator=g)
    t = torch.tensor([10, 500, 900])
    kw = {"y": torch.tensor([0, 2, 1])} if "num_classes" in config else {}
    repeated_kw = {k: v.repeat(groups) for k, v in kw.items()}
    if "in_channels" in config:
        kw["concat"] = torch.randn(batch, 5, 16, 16, generator=g)
        repeated_kw["concat"] = kw["concat"].repeat(groups, 1, 1, 1)
    rows: dict[str, list[int]] = {"conv_in": [], "attn1": [], "attn2": [], "out": []}
    first_attn1 = next(m for name, m in unet.named_modules() if name.endswith("attn1"))
    hooks = [module.register_forward_pre_hook(lambda m, args, key=key: rows[key].append(args[0].shape[0]))
             for key, module in [("conv_in", unet.input_blocks[0][0]), ("attn1", first_attn1),
                                 ("out", unet.out[2])]]
    hooks += [m.register_forward_pre_hook(lambda m, args: rows["attn2"].append(args[0].shape[0]))
              for name, m in unet.named_modules() if name.endswith("attn2")]
    with torch.no_grad():
        grouped = unet(x, t, ctx, contexts_per_input=groups, **kw)
        seen = {key: list(value) for key, value in rows.items()}
        for value in rows.values():
            value.clear()
        reference = unet(x.repeat(groups, 1, 1, 1), t.repeat(groups), ctx, **repeated_kw)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(grouped, reference, rtol=1e-5, atol=1e-5)
    shared = "pool_context" not in config
    assert seen["conv_in"] == [batch if shared else groups * batch]
    assert seen["attn1"] == [batch if shared else groups * batch]
    assert seen["attn2"] == rows["attn2"] and set(seen["attn2"]) == {groups * batch}
    assert seen["out"] == [groups * batch] and rows["conv_in"] == [groups * batch]


def test_contexts_per_input_errors() -> None:
    unet = UNet(**TINY)
    x, t, ctx = _inputs()
    for k in (0, True, 1.5):
        with pytest.raises(ValueError, match="contexts_per_input must be an integer >= 1"):
            unet(x, t, torch.cat([ctx, ctx]), contexts_per_input=k)
    with pytest.raises(ValueError, match=r"contexts_per_input=2 needs a context of 2 x 2 rows.*got \(2, 5, 32\)"):
        unet(x, t, ctx, contexts_per_input=2)
    with pytest.raises(ValueError, match="context batch 4 does not match x batch 2"):
        unet(x, t, torch.cat([ctx, ctx]))  # k groups only when asked for
    with pytest.raises(ValueError, match="context batch 4 does not match x batch 2"):
        UNet(**TINY, pool_context=True)(x, t, torch.cat([ctx, ctx]))
    with pytest.raises(ValueError, match="unconditional.*pass contexts_per_input=1"):
        UNet(**{**TINY, "context_dim": None})(x, t, contexts_per_input=2)
    block = unet.input_blocks[1][1]  # a SpatialTransformer called directly: k groups of the batch, or an error
    with pytest.raises(ValueError, match="context batch 3 is not a multiple of the input batch 2"):
        block(torch.randn(2, 32, 16, 16), torch.randn(3, 5, 32))


def test_unconditional_unet_uses_self_attention() -> None:
    """Without a context, attn2 attends over the feature map itself: its keys come from its own input."""
    unet = UNet(**{**TINY, "context_dim": None})
    _randomize(unet)
    x, t, _ = _inputs()
    seen = []
    attn2 = next(m for name, m in unet.named_modules() if name.endswith("attn2"))
    attn2.to_k.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    attn2.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0]), with_kwargs=True)
    out = unet(x, t)
    assert out.shape == x.shape
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])  # the keys' input is the attention's own input
    with torch.no_grad():
        attn2.to_v.weight.mul_(2)
    assert not torch.allclose(unet(x, t), out)  # and it reaches the output


def test_pool_context_conditions_every_block_through_the_embedding() -> None:
    # cross-attention values zeroed: without pooling the context cannot reach the output, with it it must
    def deaf(unet: UNet) -> UNet:
        _randomize(unet)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "attn2.to_v" in name:
                    p.zero_()
        return unet

    x, t, ctx = _inputs()
    other = torch.randn_like(ctx)
    plain = deaf(UNet(**TINY))
    torch.testing.assert_close(plain(x, t, ctx), plain(x, t, other))
    pooled = deaf(UNet(**TINY, pool_context=True))
    assert not torch.allclose(pooled(x, t, ctx), pooled(x, t, other))
    # the pool is the mean token: permuting the tokens changes nothing, and it adds to the timestep embedding
    torch.testing.assert_close(pooled(x, t, ctx), pooled(x, t, ctx.flip(1)))
    seen = {}
    block = pooled.input_blocks[1][0]
    hook = block.register_forward_hook(lambda m, args, out: seen.__setitem__("emb", args[1]))
    pooled(x, t, ctx)
    hook.remove()
    expected = pooled.time_embed(timestep_embedding(t, 32)) + pooled.context_emb(ctx.mean(1))
    torch.testing.assert_close(seen["emb"], expected)
    assert pooled.config["pool_context"] is True
    with pytest.raises(ValueError, match="pool_context=true pools the text context, but context_dim is None"):
        UNet(**{**TINY, "context_dim": None}, pool_context=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm32_on_cpu_bf16_equals_the_float32_round_trip(channels_last: bool):
    """bf16 CPU activations go to torch's mixed-dtype kernel (float32 inside) on contiguous memory: the output and
    the gradients are those of normalising a float32 copy and casting back, to bf16's last bit."""
    from ldm.nn.norm import group_norm

    torch.manual_seed(0)
    norm = group_norm(64)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5)
        norm.bias.normal_()
    x = (torch.randn(8, 64, 8, 8) * 3 + 1).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = norm(a)
    ref = torch.nn.functional.group_norm(b.float(), 32, norm.weight, norm.bias, 1e-5).bfloat16()
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    torch.testing.assert_close(out.float(), ref.float(), rtol=8e-3, atol=1e-5)  # one bf16 rounding apart at most
    grad = torch.randn(out.shape).bfloat16()
    (ga,) = torch.autograd.grad(out, a, grad)
    (gb,) = torch.autograd.grad(ref, b, grad)
    torch.testing.assert_close(ga.float(), gb.float(), rtol=8e-3, atol=1e-5)


def test_group_norm32_normalises_in_float32_whatever_the_dtypes():
    from ldm.nn.norm import group_norm

    torch.manual_seed(0)
    norm = group_norm(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 64, 4, 4) * 3 + 1
    ref = torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(norm(x), ref)
    # bfloat16 input: the statistics in float32, the output back in bfloat16
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.nn.functional.group_norm(x.bfloat16().float(), 32, norm.weight,
                                                                           norm.bias, 1e-5), atol=0.05, rtol=0.02)
    # bfloat16 weights (FSDP's param_dtype, bf16-true) with a float32 input: no mixed-dtype error, a float32 output
    norm_bf16 = group_norm(64).bfloat16()
    norm_bf16.load_state_dict({k: v.bfloat16() for k, v in norm.state_dict().items()})
    out = norm_bf16(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.nn.functional.group_norm(x, 32, norm.weight.bfloat16().float(),
                                                                   norm.bias.bfloat16().float(), 1e-5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(channel_mult=(1, 1.5)), r"channel_mult must hold integers >= 1 .*got \[1, 1.5\]"),
    (dict(channel_mult=(1, 0)), r"channel_mult must hold integers >= 1"),
    (dict(num_heads=0), r"num_heads=0 cannot split an attention level of 32 channels"),
    (dict(num_heads=64), r"num_heads=64 cannot split an attention level of 32 channels"),
    (dict(num_heads=-1, num_head_channels=128), r"num_head_channels=128 leaves a level of 32 channels without a head"),
])
def test_impossible_widths_and_heads_are_refused_when_built(kwargs, match) -> None:
    """A fractional multiplier was truncated (another network than configured, silently); zero heads built and failed
    at the first forward with an unrelated error."""
    with pytest.raises(ValueError, match=match):
        UNet(**{**TINY, "attention_resolutions": (1, 2), **kwargs})


def test_a_fractional_autoencoder_multiplier_is_refused() -> None:
    from ldm.autoencoder import AutoencoderKL

    with pytest.raises(ValueError, match=r"ch_mult must hold integers >= 1 .*got \[1, 1.5\]"):
        AutoencoderKL(ch=32, ch_mult=(1, 1.5), num_res_blocks=1)
