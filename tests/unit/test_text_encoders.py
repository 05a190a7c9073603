"""Text encoder interface: scratch encoder, freezing, null embedding, Hydra presets, errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ldm.text import ScratchTextEncoder, TextEncoding  # noqa: E402

CONF = Path(__file__).resolve().parents[2] / "conf" / "text_encoder"


def tiny_scratch(**kw) -> ScratchTextEncoder:
    torch.manual_seed(0)
    args = dict(width=32, layers=2, heads=4, context_length=16)
    args.update(kw)
    return ScratchTextEncoder(**args)


def test_scratch_shapes_and_pooled_is_eot_feature():
    enc = tiny_scratch()
    out = enc.encode(["a red circle", "a blue square on the left", ""])
    assert isinstance(out, TextEncoding)
    assert out.hidden.shape == (3, 16, 32) and out.pooled.shape == (3, 32) and out.mask.shape == (3, 16)
    assert enc.width == enc.pooled_width == 32 and enc.context_length == 16
    eot = out.mask.sum(1) - 1
    assert torch.equal(out.pooled, out.hidden[torch.arange(3), eot])


def test_scratch_gradients_reach_every_parameter():
    enc = tiny_scratch()
    assert not enc.frozen and enc.training
    out = enc.encode(["a red circle", "two green triangles"])
    (out.hidden.square().mean() + out.pooled.sum()).backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_scratch_token_embeddings_start_at_unit_scale():
    # Not CLIP's 0.02: at that scale the blocks' residual outputs drowned each word in joint training (see scratch.py).
    assert tiny_scratch(width=128).token_embedding.weight.std().item() == pytest.approx(1.0, rel=0.01)
    assert tiny_scratch(width=128, token_embedding_std=0.02).token_embedding.weight.std().item() == pytest.approx(
        0.02, rel=0.01)


def test_fixed_token_embeddings_keep_their_init_while_the_rest_of_the_tower_trains():
    enc = tiny_scratch(train_token_embedding=False)
    everything = {n for n, _ in enc.named_parameters()}
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == everything - {"token_embedding.weight"}
    enc.frozen = True  # freezing and unfreezing the whole encoder keeps the table fixed
    assert not any(p.requires_grad for p in enc.parameters())
    enc.frozen = False
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == trainable
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    out = enc.encode(["a red circle", "two green triangles"])
    assert out.hidden.requires_grad
    (out.hidden.square().mean() + out.pooled.sum()).backward()
    opt.step()
    assert enc.token_embedding.weight.grad is None
    assert torch.equal(enc.token_embedding.weight, before["token_embedding.weight"])
    moved = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    assert moved == everything - {"token_embedding.weight"}
    # the same seed draws the same table whether it trains or not (a preset switch keeps the init)
    assert torch.equal(tiny_scratch().token_embedding.weight, before["token_embedding.weight"])


def test_scratch_causal_mask():
    enc = tiny_scratch().eval()
    ids, mask = enc.tokenizer(["a red circle in the corner"])
    changed = ids.clone()
    changed[0, 4] = 1000  # change the 5th token
    with torch.no_grad():
        h1, _ = enc.encode_tokens(ids, mask)
        h2, _ = enc.encode_tokens(changed, mask)
    torch.testing.assert_close(h1[:, :4], h2[:, :4], rtol=0, atol=0)
    assert not torch.allclose(h1[:, 4:], h2[:, 4:])
    # without the causal mask, earlier positions see the change (padding is masked out instead)
    bi = tiny_scratch(causal=False).eval()
    with torch.no_grad():
        b1, _ = bi.encode_tokens(ids, mask)
        b2, _ = bi.encode_tokens(changed, mask)
    assert not torch.allclose(b1[:, :4], b2[:, :4])


@pytest.mark.parametrize("causal", [True, False])
def test_scratch_self_attention_is_torch_sdpa(causal: bool):
    """The blocks' attention (through ldm.nn.attention) equals torch's SDPA with is_causal, or with the key mask."""
    from ldm.text.scratch import _SelfAttention

    torch.manual_seed(0)
    layer = _SelfAttention(width=32, heads=4, causal=causal)
    x = torch.randn(3, 10, 32)
    key_mask = torch.ones(3, 10, dtype=torch.bool)
    key_mask[1, 6:] = key_mask[2, 3:] = False
    q, k, v = layer.qkv(x).view(3, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    y = sdpa(q, k, v, is_causal=True) if causal else sdpa(q, k, v, attn_mask=key_mask[:, None, None, :])
    torch.testing.assert_close(layer(x, key_mask), layer.out(y.transpose(1, 2).reshape(3, 10, 32)))


def test_scratch_attention_under_cpu_bf16_autocast_runs_in_float32():
    """Trained under bf16-mixed on the CPU, the blocks' attention takes ldm.nn.attention's float32 kernel (torch's bf16
    backward is the slow one): the result is float32 SDPA of the bf16 projections, rounded once."""
    from ldm.text.scratch import _SelfAttention

    torch.manual_seed(0)
    layer = _SelfAttention(width=32, heads=4, causal=False)
    x = torch.randn(3, 10, 32)
    key_mask = torch.ones(3, 10, dtype=torch.bool)
    key_mask[1, 6:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, key_mask)
        q, k, v = layer.qkv(x).view(3, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
        with torch.autocast("cpu", enabled=False):
            y = torch.nn.functional.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=key_mask[:, None, None, :]).to(torch.bfloat16)
        expected = layer.out(y.transpose(1, 2).reshape(3, 10, 32))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_frozen_encoder_has_no_grads_and_stays_in_eval():
    enc = tiny_scratch(frozen=True)
    assert enc.frozen and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    parent = torch.nn.Sequential(enc)
    parent.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not enc.encode(["a cat"]).hidden.requires_grad
    enc.frozen = False
    enc.train()
    assert enc.training and all(p.requires_grad for p in enc.parameters())


def test_null_embedding_equals_empty_prompt_and_is_cached_when_frozen():
    enc = tiny_scratch(frozen=True)
    null = enc.null_embedding()
    ref = enc.encode([""])
    for a, b in zip(null, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert enc.null_embedding() is null  # cached
    assert null.expand(3).hidden.shape == (3, 16, 32)
    enc.to(torch.float64)  # a new dtype recomputes it
    assert enc.null_embedding().hidden.dtype == torch.float64
    # new weights invalidate the cache
    other = tiny_scratch(frozen=True)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    enc.to(torch.float32).load_state_dict(other.state_dict())
    torch.testing.assert_close(enc.null_embedding().hidden, other.encode([""]).hidden)


def test_null_embedding_recomputed_when_trainable():
    enc = tiny_scratch()
    first = enc.null_embedding()
    assert first.hidden.requires_grad  # part of the graph: the encoder learns its own null
    with torch.no_grad():
        enc.final_norm.bias.add_(1.0)
    second = enc.null_embedding()
    torch.testing.assert_close(second.hidden, first.hidden.detach() + 1.0)


def test_scratch_errors():
    with pytest.raises(ValueError, match="divisible"):
        ScratchTextEncoder(width=30, heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        ScratchTextEncoder(vocab_size=1000, width=32, layers=1)
    with pytest.raises(ValueError, match="empty list"):
        tiny_scratch().encode([])


def test_scratch_preset_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "scratch_tiny.yaml")
    enc = instantiate(cfg)
    assert isinstance(enc, ScratchTextEncoder) and enc.width == cfg.width and not enc.frozen
    out = enc.encode(["a small red circle"])
    assert out.hidden.shape == (1, cfg.context_length, cfg.width)


@pytest.mark.slow
@pytest.mark.parametrize("name, width, length", [("clip_vit_l14", 768, 77), ("openclip_vit_h14", 1024, 77)])
def test_large_presets_instantiate(name, width, length):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    enc = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    assert enc.frozen and enc.width == width
    out = enc.encode(["a photograph of an astronaut riding a horse"])
    assert out.hidden.shape == (1, length, width)
