"""The transformers and open_clip back ends reproduce their libraries' outputs (tiny random models, local files)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ldm.text import CLIPTokenizer, HFCLIPTextEncoder, OpenCLIPTextEncoder  # noqa: E402

PROMPTS = ["a photo of a cat", "", "two red squares and a blue circle, on the left"]

TINY_HF = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=16,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
)
TINY_OPEN_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, patch_size=16, width=32, head_width=16, layers=1),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=3),
)


# ----------------------------------------------------------------------------- tokenizer vs transformers
def test_hf_padding_matches_transformers_clip_tokenizer():
    """Built from open_clip's vocabulary, transformers' CLIPTokenizer gives the ids our HF-mode tokenizer gives."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer as HFTokenizer

    st = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): v for k, v in st.encoder.items()}
    merges = [m for m, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    hf = HFTokenizer(vocab=vocab, merges=merges)  # pad token defaults to <|endoftext|>, as for clip-vit-large-patch14
    prompts = [*PROMPTS, "word " * 90]
    ref = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with pytest.warns(UserWarning, match="dropped 15 of 90"):
        ids, mask = CLIPTokenizer(77, pad_token_id=49407)(prompts)
    assert torch.equal(ids, ref.input_ids)
    assert torch.equal(mask, ref.attention_mask.bool())


# ----------------------------------------------------------------------------- transformers back end
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip_text")
    CLIPTextModelWithProjection(CLIPTextConfig(**TINY_HF)).save_pretrained(path)
    return path


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_hf_backend_matches_transformers(hf_dir, clip_skip):
    from transformers import CLIPTextModel

    enc = HFCLIPTextEncoder(pretrained_path=hf_dir, clip_skip=clip_skip)
    ref_model = CLIPTextModel.from_pretrained(hf_dir, local_files_only=True).eval()
    ids, _ = CLIPTokenizer(77, pad_token_id=49407)(PROMPTS)
    captured = {}
    # independent of hidden_states indexing: grab the output of block (L - clip_skip) with a hook
    layer = ref_model.encoder.layers[-clip_skip]
    handle = layer.register_forward_hook(lambda m, i, o: captured.setdefault("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        ref = ref_model(input_ids=ids)
    handle.remove()
    out = enc.encode(PROMPTS)
    expected = ref_model.final_layer_norm(captured["x"]) if clip_skip > 1 else ref.last_hidden_state
    torch.testing.assert_close(out.hidden, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled, ref.pooler_output, rtol=1e-5, atol=1e-5)
    assert enc.width == 32 and out.hidden.shape == (3, 77, 32)
    if clip_skip == 2:
        assert not torch.allclose(out.hidden, ref.last_hidden_state, atol=1e-3)


def test_hf_backend_with_projection_and_config_init(hf_dir):
    from transformers import CLIPTextModelWithProjection

    enc = HFCLIPTextEncoder(pretrained_path=hf_dir, with_projection=True, config=TINY_HF)
    ref = CLIPTextModelWithProjection.from_pretrained(hf_dir, local_files_only=True).eval()
    ids, _ = enc.tokenizer(PROMPTS)
    with torch.no_grad():
        expected = ref(input_ids=ids).text_embeds
    torch.testing.assert_close(enc.encode(PROMPTS).pooled, expected, rtol=1e-5, atol=1e-5)
    assert enc.pooled_width == 16
    random = HFCLIPTextEncoder(config=TINY_HF, frozen=False)
    assert random.width == 32 and random.training and all(p.requires_grad for p in random.parameters())


def test_hf_backend_frozen(hf_dir):
    enc = HFCLIPTextEncoder(pretrained_path=hf_dir)
    enc.train()
    assert not enc.model.training and not any(p.requires_grad for p in enc.parameters())
    null = enc.null_embedding()
    torch.testing.assert_close(null.hidden, enc.encode([""]).hidden, rtol=0, atol=0)


def test_hf_backend_errors(tmp_path, hf_dir):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir.*does not exist.*config=") as info:
        HFCLIPTextEncoder(pretrained_path=missing)
    assert "never downloads" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFCLIPTextEncoder(pretrained_path=tmp_path)
    with pytest.raises(ValueError, match="pretrained_path .* or config"):
        HFCLIPTextEncoder()
    with pytest.raises(ValueError, match="clip_skip"):
        HFCLIPTextEncoder(config=TINY_HF, clip_skip=4)
    with pytest.raises(ValueError, match="hidden_size: config 768 vs checkpoint 32"):
        HFCLIPTextEncoder(pretrained_path=hf_dir, config={**TINY_HF, "hidden_size": 768})
    with pytest.raises(ValueError, match="width=768"):
        HFCLIPTextEncoder(config=TINY_HF, width=768)


def test_hf_backend_reads_diffusers_pipeline_folder(tmp_path, hf_dir):
    import shutil

    shutil.copytree(hf_dir, tmp_path / "text_encoder")
    a = HFCLIPTextEncoder(pretrained_path=tmp_path).encode(["a cat"])
    b = HFCLIPTextEncoder(pretrained_path=hf_dir).encode(["a cat"])
    torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=0)


def test_a_pipeline_folder_pads_as_its_tokenizer_says(tmp_path, hf_dir):
    """An SD 2.x-style pipeline folder pads with '!' (id 0, its tokenizer/): the encoder read from the folder pads
    the same way, so its padded positions (which the UNet attends to) equal diffusers'. It padded with 49407."""
    import shutil

    from transformers import CLIPTextModel

    shutil.copytree(hf_dir, tmp_path / "text_encoder")
    CLIPTokenizer(pad_token_id=0).save_transformers_files(tmp_path / "tokenizer")
    ours = HFCLIPTextEncoder(pretrained_path=tmp_path)
    assert ours.tokenizer.pad_token_id == 0
    ids = ours.tokenizer(["a cat"])[0]
    assert ids[0, -1] == 0
    with torch.no_grad():
        reference = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")(ids).last_hidden_state
    torch.testing.assert_close(ours.encode(["a cat"]).hidden, reference, rtol=0, atol=1e-5)
    assert HFCLIPTextEncoder(pretrained_path=hf_dir).tokenizer.pad_token_id == 49407  # a bare folder: SD 1.x's
    assert HFCLIPTextEncoder(pretrained_path=tmp_path, pad_token_id=49407).tokenizer.pad_token_id == 49407


# ----------------------------------------------------------------------------- open_clip back end
@pytest.fixture(scope="module")
def open_clip_ckpt(tmp_path_factory):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-H-14", pretrained=None, **TINY_OPEN_CLIP).eval()
    path = tmp_path_factory.mktemp("open_clip") / "tiny_open_clip.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_open_clip_backend_matches_encode_text(open_clip_ckpt):
    ref, path = open_clip_ckpt
    enc = OpenCLIPTextEncoder("ViT-H-14", pretrained=path, layer="last", model_kwargs=TINY_OPEN_CLIP)
    assert not hasattr(enc.model, "visual")
    import open_clip

    ids = open_clip.tokenize(PROMPTS)
    captured = {}
    handle = ref.ln_final.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        pooled = ref.encode_text(ids)
    handle.remove()
    out = enc.encode(PROMPTS)
    torch.testing.assert_close(out.pooled, pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.hidden, captured["x"], rtol=1e-5, atol=1e-5)
    assert enc.width == 32 and enc.pooled_width == 16 and torch.equal(out.mask, ids != 0)
    assert "model.token_embedding.weight" in enc.state_dict()  # SD 2.x cond_stage_model.model.* layout


def test_open_clip_penultimate_layer(open_clip_ckpt):
    ref, path = open_clip_ckpt
    enc = OpenCLIPTextEncoder("ViT-H-14", pretrained=path, layer="penultimate", model_kwargs=TINY_OPEN_CLIP)
    import open_clip

    ids = open_clip.tokenize(PROMPTS)
    captured = {}
    # SD 2.x: run every block but the last, then ln_final
    handle = ref.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        pooled = ref.encode_text(ids)
        expected = ref.ln_final(captured["x"])
    handle.remove()
    out = enc.encode(PROMPTS)
    torch.testing.assert_close(out.hidden, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled, pooled, rtol=1e-5, atol=1e-5)  # pooled always from the full stack
    last = OpenCLIPTextEncoder("ViT-H-14", pretrained=path, layer="last", model_kwargs=TINY_OPEN_CLIP)
    assert not torch.allclose(out.hidden, last.encode(PROMPTS).hidden, atol=1e-3)


def test_open_clip_random_init_frozen_and_errors(tmp_path):
    from omegaconf import OmegaConf

    enc = OpenCLIPTextEncoder("ViT-H-14", model_kwargs=OmegaConf.create(TINY_OPEN_CLIP))  # as Hydra passes it
    assert enc.width == 32
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    torch.testing.assert_close(enc.null_embedding().hidden, enc.encode([""]).hidden, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer must be one of"):
        OpenCLIPTextEncoder("ViT-H-14", layer="second_to_last", model_kwargs=TINY_OPEN_CLIP)
    missing = tmp_path / "missing.bin"
    with pytest.raises(FileNotFoundError, match="missing.bin.*not a file.*pretrained=null"):
        OpenCLIPTextEncoder("ViT-H-14", pretrained=missing, model_kwargs=TINY_OPEN_CLIP)
    with pytest.raises(FileNotFoundError, match="laion2b_s32b_b79k' is not a file"):
        OpenCLIPTextEncoder("ViT-H-14", pretrained="laion2b_s32b_b79k", model_kwargs=TINY_OPEN_CLIP)
    with pytest.raises(ValueError, match="width=1024"):
        OpenCLIPTextEncoder("ViT-H-14", model_kwargs=TINY_OPEN_CLIP, width=1024)


@pytest.mark.parametrize("arch,extra", [("ViT-H-14-quickgelu", {}), ("ViT-H-14", {"quick_gelu": True})])
def test_an_open_clip_quickgelu_tower_survives_an_sd_file(arch, extra):
    """The SD layout holds no activation: ldm's metadata records QuickGELU, so the tower read back from the file
    encodes as the one written (it came back with GELU)."""
    from ldm.convert.single_file import load_sd_text_encoder, text_encoder_metadata, text_encoder_sd_state_dict

    torch.manual_seed(0)
    enc = OpenCLIPTextEncoder(arch, layer="penultimate", model_kwargs={**TINY_OPEN_CLIP, **extra})
    meta = text_encoder_metadata(enc)
    assert meta["quick_gelu"] is True
    back = load_sd_text_encoder(text_encoder_sd_state_dict(enc), stored=meta)
    torch.testing.assert_close(back.encode(PROMPTS).hidden, enc.encode(PROMPTS).hidden, rtol=0, atol=0)
    plain = OpenCLIPTextEncoder("ViT-H-14", layer="penultimate", model_kwargs=TINY_OPEN_CLIP)
    assert "quick_gelu" not in text_encoder_metadata(plain)  # SD 2.x's GELU: the metadata as before


@pytest.mark.parametrize("backend", ["transformers", "open_clip"])
def test_a_checkpoint_loads_after_the_text_encoders_pretrained_folder_is_gone(tmp_path, backend):
    """An ldm checkpoint holds the text encoder's weights; its header recorded the run's pretrained_path (or
    open_clip's pretrained file), so loading failed once that was moved. The header now records the architecture,
    and the encoder reads back equal."""
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.autoencoder import AutoencoderKL
    from ldm.checkpoint import describe_ldm, load_parts
    from ldm.diffusion import SamplingDefaults
    from ldm.diffusion.schedules import SD_SCHEDULE
    from ldm.unet import UNet

    source = tmp_path / "weights"
    torch.manual_seed(0)
    if backend == "transformers":
        CLIPTextModel(CLIPTextConfig(**{**TINY_HF, "hidden_act": "gelu", "num_attention_heads": 2})).save_pretrained(
            source)
        kwargs = {"pretrained_path": str(source), "clip_skip": 2}  # as the run's Hydra config gives them
        text = HFCLIPTextEncoder(**kwargs)
    else:
        import open_clip

        source.mkdir()
        torch.save(open_clip.create_model("ViT-H-14", pretrained=None, **TINY_OPEN_CLIP).state_dict(),
                   source / "open_clip.bin")
        kwargs = {"arch": "ViT-H-14", "pretrained": str(source / "open_clip.bin"), "model_kwargs": TINY_OPEN_CLIP}
        text = OpenCLIPTextEncoder(**kwargs)
    unet = UNet(4, 4, 32, (1, 2), 1, (1, 2), num_heads=2, context_dim=text.width)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 1), num_res_blocks=1)
    header = describe_ldm(unet=unet, text_encoder=text, first_stage=vae, schedule=SD_SCHEDULE,
                          prediction_type="epsilon", ema=False, text_encoder_kwargs=kwargs,
                          sampling=SamplingDefaults.from_dict({"image_size": 16}))
    state = {f"{name}.{k}": v for name, part in (("unet", unet), ("text_encoder", text), ("first_stage", vae))
             for k, v in part.state_dict().items()}
    torch.save({"ldm": header, "state_dict": state}, tmp_path / "last.ckpt")
    shutil.rmtree(source)
    loaded = load_parts(tmp_path / "last.ckpt").text_encoder
    assert header["text_encoder"]["weights_from"].startswith(str(source))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(PROMPTS).hidden, text.encode(PROMPTS).hidden, rtol=0, atol=0)
