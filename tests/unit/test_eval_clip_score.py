"""CLIP score (ldm.eval.clip_score) against torchmetrics' CLIPScore and a direct open_clip computation, on tiny
random CLIP models saved locally (nothing is downloaded), plus the command line's pairing and its errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.errors import ConfigError  # noqa: E402
from ldm.eval import clip_score as cs  # noqa: E402

CAPTIONS = ["a red circle in the top left", "a blue square", "two green triangles on a white background",
            "a photo of a cat", "", "a yellow star in the center"]
OPEN_CLIP_TINY = dict(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, head_width=16, layers=2),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-6)


@pytest.fixture(autouse=True)
def _no_env_weights(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.delenv(cs.ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Six RGB images of two sizes (the processor resizes and crops them): colour ramps with noise."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(len(CAPTIONS)):
        h, w = (40, 48) if k % 2 else (32, 32)
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, (1, 1, 3))
        arr = np.clip(ramp + rng.uniform(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr, "RGB"))
    return out


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory) -> Path:
    """A random 2-layer transformers CLIP (32-px images, patch 8) with CLIP's BPE tokenizer, built offline from
    open_clip's bundled vocabulary, saved as a CLIPModel + CLIPProcessor folder. torchmetrics loads a local path only
    when its name contains "openai"."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    st = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): v for k, v in st.encoder.items()}
    merges = [m for m, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(1)  # cosines of both signs on these pairs: per-pair clamping matters
    path = tmp_path_factory.mktemp("clip") / "openai-tiny-clip"
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny open_clip model config (open_clip's JSON layout) and random weights saved as .safetensors."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    config = root / "tiny-test-clip.json"
    config.write_text(json.dumps(OPEN_CLIP_TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-test-clip")
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return config, weights


def _uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _torchmetrics(folder: Path):
    """torchmetrics' CLIPScore on the local folder. torchmetrics 1.9 predates transformers 5, whose
    get_image_features / get_text_features return an output object (Lightning-AI/torchmetrics#3407): the model is
    wrapped to unwrap it, as the fix merged upstream (PR #3408) does; the math is torchmetrics'."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=str(folder))
    inner = metric.model

    class Unwrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def get_image_features(self, *args, **kwargs):
            return cs._features(self.inner.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return cs._features(self.inner.get_text_features(*args, **kwargs))

    metric.model = Unwrapped()
    return metric


def test_transformers_backend_matches_torchmetrics(hf_clip, images) -> None:
    ours = cs.clip_score(images, CAPTIONS, model_path=hf_clip, batch_size=4)
    metric = _torchmetrics(hf_clip)
    per_pair = []  # torchmetrics on one pair: max(100 * cos, 0)
    for image, caption in zip(images, CAPTIONS, strict=True):
        metric.reset()
        metric.update(_uint8(image), caption)
        per_pair.append(float(metric.compute()))
    assert _close(ours, float(np.mean(per_pair))), (ours, per_pair)
    assert 0 < ours < 100 and min(per_pair) == 0 < max(per_pair)  # informative: some pairs clamped, some not
    # on the whole set torchmetrics clamps the mean, not each pair: the same value when no cosine is negative
    raw = cs.load_clip(model_path=hf_clip).scores(images, CAPTIONS)
    metric.reset()
    metric.update([_uint8(im) for im in images], CAPTIONS)
    assert _close(float(metric.compute()), max(float(raw.mean()), 0.0))
    torch.testing.assert_close(raw.clamp(min=0), torch.tensor(per_pair), rtol=1e-4, atol=1e-4)
    # PIL images and uint8 tensors score the same; the batch size does not matter
    assert _close(cs.clip_score([_uint8(im) for im in images], CAPTIONS, model_path=hf_clip, batch_size=32), ours)
    same_size = [_uint8(im.resize((32, 32))) for im in images]
    batch = torch.stack(same_size)  # one [N, 3, H, W] tensor, as compute_metrics takes it
    assert _close(cs.clip_score(batch, CAPTIONS, model_path=hf_clip, batch_size=3),
                  cs.clip_score(same_size, CAPTIONS, model_path=hf_clip, batch_size=3))


def test_open_clip_backend_matches_open_clip(open_clip_files, images) -> None:
    import open_clip

    config, weights = open_clip_files
    ours = cs.clip_score(images, CAPTIONS, open_clip_model=str(config), weights=weights, batch_size=4)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-test-clip", pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer("tiny-test-clip")
    with torch.no_grad():
        img = model.eval().encode_image(torch.stack([preprocess(im) for im in images]))
        txt = model.encode_text(tokenizer(CAPTIONS))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    expected = float((100 * cos).clamp(min=0).mean())
    assert _close(ours, expected), (ours, expected)
    assert ours > 0


def _generated(tmp_path: Path, images) -> Path:
    """A folder laid out as ldm.eval.generate writes it."""
    out = tmp_path / "gen"
    out.mkdir()
    for i, (image, caption) in enumerate(zip(images, CAPTIONS, strict=True)):
        image.save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(caption)
    return out


def _last_value(capsys) -> float:
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("clip_score=")
    return float(last.split("=", 1)[1])


def test_cli_pairs_images_with_their_captions(hf_clip, open_clip_files, images, tmp_path, monkeypatch,
                                              capsys) -> None:
    folder = _generated(tmp_path, images)
    want = cs.clip_score(images, CAPTIONS, model_path=hf_clip)
    assert cs.main([str(folder), "--clip", str(hf_clip)]) == 0
    assert _close(_last_value(capsys), want, 1e-5)
    # --captions: image i takes line i modulo the count; here the first three lines, repeated
    lines = tmp_path / "captions.txt"
    lines.write_text("\n".join(CAPTIONS[:3]) + "\n\n")
    assert cs.main([str(folder), "--captions", str(lines), "--clip", str(hf_clip)]) == 0
    want3 = cs.clip_score(images, [CAPTIONS[i % 3] for i in range(6)], model_path=hf_clip)
    assert _close(_last_value(capsys), want3, 1e-5) and not _close(want3, want, 1e-3)
    # the folder from the environment
    monkeypatch.setenv(cs.ENV_VAR, str(hf_clip))
    assert cs.main([str(folder)]) == 0
    assert _close(_last_value(capsys), want, 1e-5)
    # open_clip: the model config and its weights
    config, weights = open_clip_files
    assert cs.main([str(folder), "--open-clip", str(config), "--weights", str(weights)]) == 0
    assert _close(_last_value(capsys), cs.clip_score(images, CAPTIONS, open_clip_model=str(config), weights=weights),
                  1e-5)


def test_missing_weights_name_what_and_where(tmp_path, hf_clip, capsys) -> None:
    with pytest.raises(ConfigError, match=f"never downloads.*{cs.HF_MODEL}.*{cs.ENV_VAR}"):
        cs.load_clip()
    with pytest.raises(ConfigError, match="needs its weights file"):
        cs.load_clip(open_clip_model="ViT-B-32")
    with pytest.raises(ConfigError, match="does not exist"):
        cs.load_clip(model_path=tmp_path / "nothing")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file: a transformers CLIP model is a folder"):
        cs.load_clip(model_path=tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="unknown open_clip model 'ViT-Nope'"):
        cs.load_clip(open_clip_model="ViT-Nope", weights=tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="no config.json"):
        cs.load_clip(model_path=tmp_path)
    folder = tmp_path / "gen"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "000000.png")
    assert cs.main([str(folder), "--clip", str(hf_clip)]) == 2  # no caption beside the image
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no caption for") and "000000.txt" in err and len(err.splitlines()) == 1
    (folder / "000000.txt").write_text("a black square")
    assert cs.main([str(folder)]) == 2  # no model
    assert "never downloads" in capsys.readouterr().err
    assert cs.main([str(tmp_path / "none")]) == 2
    assert "is not a folder of images" in capsys.readouterr().err
