"""CLIP score of generated images against their captions, 100 * max(cos(image, caption), 0) averaged over the pairs
(Hessel et al., 2021; torchmetrics' CLIPScore formula), from local CLIP weights only: offline nodes cannot download.

    python -m ldm.eval.clip_score DIR [--captions FILE] [--clip PATH] [--open-clip NAME --weights PATH]
        [--batch-size N] [--device cpu]

DIR's images pair with the captions ``python -m ldm.eval.generate`` writes beside them (``000123.png`` with
``000123.txt``), or with FILE's non-blank lines (image ``000123.png`` takes line 123 modulo their number). The model
is a transformers CLIP folder (``CLIPModel`` and ``CLIPProcessor`` saved with ``save_pretrained``: --clip DIR) or an
open_clip model (--open-clip NAME, or the path of an open_clip model-config JSON, with --weights FILE, a .pt or
.safetensors state dict); without a flag, $LDM_CLIP_WEIGHTS names the folder or file. The last line is
``clip_score=<value>``. Wrong input prints ``error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.data.make_shards import IMAGE_SUFFIXES
from ldm.errors import ConfigError
from ldm.eval.generate import read_captions

ENV_VAR = "LDM_CLIP_WEIGHTS"
HF_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics' default CLIP, the usual one for text-to-image papers
WHERE_TO_GET = (
    f"ldm never downloads CLIP weights. On a machine with internet, save a transformers CLIP folder, e.g. "
    f"`python -c \"from transformers import CLIPModel, CLIPProcessor as P; "
    f"CLIPModel.from_pretrained('{HF_MODEL}').save_pretrained('clip'); P.from_pretrained('{HF_MODEL}')"
    f".save_pretrained('clip')\"`, copy it here and pass --clip clip (model_path= in Python) or set {ENV_VAR}=clip; "
    "or give an open_clip model and its weights file: --open-clip ViT-L-14 --weights FILE (open_clip_model=, "
    "weights=)")

ImageLike = Image.Image | torch.Tensor


@dataclass
class CLIPScorer:
    """A loaded CLIP model: ``embed_images(list of RGB PIL images)`` and ``embed_texts(list of str)`` give the
    projected embeddings; ``description`` names the backend and weights."""

    embed_images: Callable[[list[Image.Image]], torch.Tensor]
    embed_texts: Callable[[list[str]], torch.Tensor]
    description: str

    @torch.no_grad()
    def scores(self, images: Sequence[ImageLike], captions: Sequence[str]) -> torch.Tensor:
        """100 * cos(image embedding, caption embedding) of each pair, not clamped (one batch: both go through the
        model at once)."""
        if len(images) != len(captions):
            raise ConfigError(f"got {len(images)} images for {len(captions)} captions: give one caption per image")
        image_emb = self.embed_images([_rgb(im) for im in images]).float()
        text_emb = self.embed_texts(list(captions)).float()
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return (100 * (image_emb * text_emb).sum(dim=-1)).cpu()


def _rgb(image: ImageLike) -> Image.Image:
    """A PIL image, or a uint8 [3, H, W] tensor, as an RGB PIL image."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ConfigError(f"image tensors must be uint8 [3, H, W] (or [1, H, W]), got {image.dtype} "
                              f"{tuple(image.shape)}")
        arr = image.expand(3, -1, -1).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if not isinstance(image, Image.Image):
        raise ConfigError(f"images must be PIL images or uint8 tensors, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _features(out: torch.Tensor | object) -> torch.Tensor:
    """transformers < 5 returns the projected embeddings; 5 wraps them as ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


def _transformers_scorer(folder: Path, device: torch.device) -> CLIPScorer:
    from transformers import CLIPModel, CLIPProcessor

    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a transformers CLIP folder (no config.json): save one with "
                          f"CLIPModel.save_pretrained and CLIPProcessor.save_pretrained. {WHERE_TO_GET}")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a CLIP model and processor from {folder} ({str(err).splitlines()[0]}): it "
                          "needs CLIPModel.save_pretrained's config.json and weights plus CLIPProcessor's files "
                          "(preprocessor/processor config, tokenizer)") from None
    model = model.eval().to(device)
    max_length = model.config.text_config.max_position_embeddings

    def embed_images(images: list[Image.Image]) -> torch.Tensor:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        return _features(model.get_image_features(pixel_values=pixels))

    def embed_texts(texts: list[str]) -> torch.Tensor:
        tokens = processor(text=texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        return _features(model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                 attention_mask=tokens["attention_mask"].to(device)))

    return CLIPScorer(embed_images, embed_texts, f"transformers CLIP {folder}")


def _open_clip_scorer(name: str, weights: Path, device: torch.device) -> CLIPScorer:
    import open_clip

    if name.endswith(".json"):  # a model config of open_clip's layout, registered under its file name
        config = Path(name)
        if not config.is_file():
            raise ConfigError(f"--open-clip {name}: no such model-config file")
        open_clip.add_model_config(config)
        name = config.stem
    if name.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"--open-clip {name}: give an open_clip model name (e.g. ViT-L-14) and its weights file; "
                          "hub models are downloaded, and a local model folder is a --clip folder for transformers")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown open_clip model {name!r}: choose one of open_clip.list_models() (e.g. ViT-B-32, "
                          "ViT-L-14, ViT-H-14) or give the path of a model-config .json")
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ConfigError(f"open_clip model {name} takes its text tower or tokenizer from the Hugging Face hub, which "
                          "ldm does not download: use a transformers CLIP folder (--clip) or another model")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights), device=device)
    except RuntimeError as err:  # load_state_dict: keys or shapes that do not fit
        raise ConfigError(f"{weights} does not hold weights of the open_clip model {name}: "
                          f"{str(err).splitlines()[0]}") from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(name, context_length=getattr(model, "context_length", None))

    def embed_images(images: list[Image.Image]) -> torch.Tensor:
        return model.encode_image(torch.stack([preprocess(im) for im in images]).to(device))

    def embed_texts(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device))

    return CLIPScorer(embed_images, embed_texts, f"open_clip {name} {weights}")


def load_clip(*, model_path: str | os.PathLike | None = None, open_clip_model: str | None = None,
              weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> CLIPScorer:
    """A CLIP model from local files: the transformers folder ``model_path``, or the open_clip model
    ``open_clip_model`` (a name or a model-config .json) with the state-dict file ``weights``. What is not given
    comes from $LDM_CLIP_WEIGHTS; nothing is downloaded, and a missing model is a ConfigError saying where to get
    one."""
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device {device!r} is not a torch device ({err}); e.g. cpu, cuda, cuda:1") from None
    if open_clip_model is not None:
        if model_path is not None:
            raise ConfigError("give either model_path (a transformers CLIP folder) or open_clip_model with weights, "
                              "not both")
        origin, path = "weights", weights
        if path is None or str(path) == "":
            origin, path = f"${ENV_VAR}", os.environ.get(ENV_VAR, "")
        if not path:
            raise ConfigError(f"open_clip model {open_clip_model} needs its weights file: pass --weights FILE "
                              f"(weights= in Python) or set {ENV_VAR}=FILE. {WHERE_TO_GET}")
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"{origin} {path} is not a file: point it at the open_clip model's .pt or "
                              f".safetensors weights. {WHERE_TO_GET}")
        return _open_clip_scorer(open_clip_model, file, device)
    if weights is not None:
        raise ConfigError("weights= is the open_clip weights file: give open_clip_model too, or model_path for a "
                          "transformers CLIP folder")
    origin, path = "model_path", model_path
    if path is None or str(path) == "":
        origin, path = f"${ENV_VAR}", os.environ.get(ENV_VAR, "")
    if not path:
        raise ConfigError(f"no CLIP model given: pass --clip DIR (model_path= in Python) or set {ENV_VAR}=DIR. "
                          f"{WHERE_TO_GET}")
    folder = Path(path).expanduser()
    if folder.is_file():
        raise ConfigError(f"{origin} {path} is a file: a transformers CLIP model is a folder; for open_clip weights "
                          "also give the model (--open-clip NAME)")
    if not folder.is_dir():
        raise ConfigError(f"{origin} {path} does not exist: point it at a local transformers CLIP folder. "
                          f"{WHERE_TO_GET}")
    return _transformers_scorer(folder, device)


def clip_score(images: Sequence[ImageLike], captions: Sequence[str], *, model_path: str | os.PathLike | None = None,
               open_clip_model: str | None = None, weights: str | os.PathLike | None = None, batch_size: int = 32,
               device: str | torch.device = "cpu") -> float:
    """Mean over the pairs of 100 * max(cos(image embedding, caption embedding), 0); ``images[k]`` (PIL, or uint8
    [3, H, W] tensors) pairs with ``captions[k]``. The model arguments are :func:`load_clip`'s."""
    if len(images) != len(captions) or len(images) == 0:  # len: a [N, 3, H, W] tensor is N images
        raise ConfigError(f"got {len(images)} images for {len(captions)} captions: give one caption per image, and "
                          "at least one pair")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    scorer = load_clip(model_path=model_path, open_clip_model=open_clip_model, weights=weights, device=device)
    scores = [scorer.scores(images[i:i + batch_size], captions[i:i + batch_size])
              for i in range(0, len(images), batch_size)]
    return float(torch.cat(scores).clamp(min=0).mean())


# ---------------------------------------------------------------------------------------------- command line


def read_pairs(folder: str | os.PathLike, captions_file: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """(image, caption) of each image in ``folder`` (not recursive; sorted by name): the caption is the ``.txt``
    beside the image or, with ``captions_file``, line ``int(stem)`` modulo the number of lines (line ``position``
    for names that are not numbers)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of images: give the --out folder of python -m ldm.eval.generate")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}): generate them first "
                          "(python -m ldm.eval.generate) or point at the right folder")
    if captions_file is not None:
        lines = read_captions(Path(captions_file))
        numbered = all(p.stem.isdigit() for p in files)
        return [(p, lines[(int(p.stem) if numbered else k) % len(lines)]) for k, p in enumerate(files)]
    pairs = []
    for p in files:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            raise ConfigError(f"no caption for {p}: expected {txt.name} beside it (python -m ldm.eval.generate writes "
                              "one per image) or pass --captions FILE")
        pairs.append((p, txt.read_text(encoding="utf-8").strip()))
    return pairs


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as err:
        raise ConfigError(f"{path} is not an image PIL can read ({err}): delete it (generate rewrites it)") from None


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with ``error: ...`` on stderr for wrong input)."""
    p = argparse.ArgumentParser(prog="python -m ldm.eval.clip_score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="folder of images (with a .txt caption beside each, unless --captions)")
    p.add_argument("--captions", default=None, metavar="FILE",
                   help="one caption per line (image i: line i modulo their number)")
    p.add_argument("--clip", default=None, metavar="PATH",
                   help=f"transformers CLIP folder (default: ${ENV_VAR}); with --open-clip, the weights file")
    p.add_argument("--open-clip", default=None, metavar="NAME", help="open_clip model name or model-config .json")
    p.add_argument("--weights", default=None, metavar="PATH", help=f"open_clip weights file (default: ${ENV_VAR})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    args = p.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        pairs = read_pairs(args.dir, args.captions)
        if args.open_clip is not None:
            scorer = load_clip(open_clip_model=args.open_clip, weights=args.weights or args.clip, device=args.device)
        else:
            if args.weights is not None:
                raise ConfigError("--weights is the open_clip weights file: give --open-clip NAME too, or --clip DIR "
                                  "for a transformers CLIP folder")
            scorer = load_clip(model_path=args.clip, device=args.device)
        scores = []
        for i in range(0, len(pairs), args.batch_size):
            batch = pairs[i:i + args.batch_size]
            scores.append(scorer.scores([_open(path) for path, _ in batch], [caption for _, caption in batch]))
    except ConfigError as err:  # a wrong input: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    value = float(torch.cat(scores).clamp(min=0).mean())
    print(f"images: {args.dir} (n={len(pairs)})")
    print(f"model: {scorer.description}")
    print(f"clip_score={value:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
