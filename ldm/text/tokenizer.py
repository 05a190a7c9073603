"""CLIP byte-pair tokenizer with fixed-length padding, offline.

Wraps open_clip's ``SimpleTokenizer``, whose BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``) ships inside the
open_clip package, so nothing is fetched from a hub. Every prompt becomes ``[sot] + bpe(prompt) + [eot]`` followed by
padding up to ``context_length``.

The pad id differs between the two CLIP lineages, and the encoders built on top care:

* open_clip (``open_clip.tokenize``, SD 2.x's OpenCLIP ViT-H/14) pads with **0**.
* transformers' ``CLIPTokenizer`` for ``openai/clip-vit-large-patch14`` (SD 1.x) pads with the end-of-text token
  **49407**, and SD 1.x's UNet saw those padded positions during training.

Each encoder therefore builds its tokenizer with the pad id of its back end (``pad_token_id``). The attention mask is
True from the start token through the end token and False on padding, whatever the pad id.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from ldm.errors import ConfigError

SOT_TOKEN_ID = 49406  # <start_of_text>
EOT_TOKEN_ID = 49407  # <end_of_text>
OPEN_CLIP_PAD_ID = 0
HF_CLIP_PAD_ID = EOT_TOKEN_ID


def _open_clip_tokenizer_module() -> ModuleType:
    """open_clip's ``tokenizer`` module, loaded from its file. Importing it as ``open_clip.tokenizer`` runs the
    package's ``__init__`` first, which imports its models, torchvision and transformers (about 6 s of a sampling
    script's start on a 2-core CPU) that the tokenizer does not use. Where open_clip is imported already, or a
    release makes the module depend on its package, it is the ordinary import (the same code, slower to start)."""
    if "open_clip" not in sys.modules:
        spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
        if spec is not None and spec.origin is not None:
            path = Path(spec.origin).with_name("tokenizer.py")
            name = "_ldm_open_clip_tokenizer"  # top-level: a relative import in it fails, not resolved in ldm
            file_spec = importlib.util.spec_from_file_location(name, path)
            if file_spec is not None and file_spec.loader is not None:
                module = importlib.util.module_from_spec(file_spec)
                sys.modules[name] = module  # registered while it runs, as an import would (dataclasses look it up)
                try:
                    file_spec.loader.exec_module(module)
                    return module
                except ImportError:  # a relative import: it needs its package
                    del sys.modules[name]
    return importlib.import_module("open_clip.tokenizer")


@functools.lru_cache(maxsize=1)
def _simple_tokenizer():
    """One shared open_clip SimpleTokenizer per process (reading the vocabulary takes a fraction of a second)."""
    return _open_clip_tokenizer_module().SimpleTokenizer()


@functools.lru_cache(maxsize=65536)
def _bpe_ids(prompt: str) -> tuple[int, ...]:
    """BPE ids of one prompt, memoised: training captions repeat, and BPE in Python costs ~0.3 ms per caption."""
    return tuple(_simple_tokenizer().encode(prompt))


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


class CLIPTokenizer:
    """Turn a batch of prompts into ``(input_ids [B, L] long, attention_mask [B, L] bool)`` with L = context_length.

    Prompts longer than ``context_length - 2`` BPE tokens are cut (the end token is kept) and a warning names each
    cut prompt and how many tokens it lost: silently truncated captions are a classic source of "the model ignores
    the end of my prompt".
    """

    def __init__(self, context_length: int = 77, pad_token_id: int = OPEN_CLIP_PAD_ID) -> None:
        if context_length < 2:
            raise ValueError(
                f"context_length must leave room for the start and end tokens (>= 2), got {context_length}"
            )
        self.context_length = context_length
        self.pad_token_id = pad_token_id
        bpe = _simple_tokenizer()
        self.sot_token_id: int = bpe.sot_token_id
        self.eot_token_id: int = bpe.eot_token_id
        self.vocab_size: int = bpe.vocab_size
        if not 0 <= pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be a valid token id in [0, {self.vocab_size}), got {pad_token_id}")

    def encode(self, prompt: str) -> list[int]:
        """BPE ids of one prompt, without start/end tokens and without truncation."""
        return list(_bpe_ids(prompt))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of one row of ids: what lies between the start token and the first end token (padding ignored)."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.sot_token_id:
            ids = ids[1:]
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        return _simple_tokenizer().decode(ids).strip()

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("CLIPTokenizer takes a list of prompts; wrap a single prompt as [prompt]")
        prompts = list(prompts)
        if not prompts:
            raise ValueError(
                "CLIPTokenizer got an empty list of prompts; pass at least one (use '' for the null prompt)"
            )
        batch, length = len(prompts), self.context_length
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.bool)
        room = length - 2
        cut: list[str] = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is {type(prompt).__name__}, expected str")
            body = self.encode(prompt)
            if len(body) > room:
                cut.append(f"prompt {i} {_preview(prompt)}: dropped {len(body) - room} of {len(body)} tokens")
                body = body[:room]
            tokens = [self.sot_token_id, *body, self.eot_token_id]
            input_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[i, : len(tokens)] = True
        if cut:
            warnings.warn(
                f"CLIPTokenizer: {len(cut)} prompt(s) exceed the context length of {length} tokens "
                f"({room} + start/end) and were truncated: " + "; ".join(cut),
                UserWarning,
                stacklevel=2,
            )
        return input_ids, mask

    def save_transformers_files(self, folder: str | Path) -> None:
        """Write this vocabulary as transformers' ``CLIPTokenizer`` reads it (``vocab.json``, ``merges.txt`` and its
        configs: the special tokens under CLIP's names, this context length and pad id), for a diffusers pipeline
        folder: the ids are the same BPE's. transformers then tokenizes prompts as this tokenizer does, except (as
        for the SD 2.x tokenizer folders) ``!`` when the pad id is 0 (the pad token, ``!``, is special there and
        splits out as the pad id), and text that ftfy and HTML unescaping change here (``&amp;``, ligatures)."""
        import json  # noqa: PLC0415

        bpe = _simple_tokenizer()
        names = {self.sot_token_id: "<|startoftext|>", self.eot_token_id: "<|endoftext|>"}  # open_clip renames them
        vocab = {names.get(i, token): i for token, i in bpe.encoder.items()}
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                           encoding="utf-8")
        pad = names.get(self.pad_token_id) or {i: t for t, i in vocab.items()}[self.pad_token_id]
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": pad}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length, **special}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    def __repr__(self) -> str:
        return f"CLIPTokenizer(context_length={self.context_length}, pad_token_id={self.pad_token_id})"


def folder_pad_token_id(folder: str | Path) -> int | None:
    """The pad id of a diffusers folder's ``tokenizer/`` (transformers' CLIPTokenizer files): its pad token
    (special_tokens_map.json, else tokenizer_config.json) looked up in vocab.json. None without those files. SD 2.x
    folders pad with ``!`` (id 0), SD 1.x ones with ``<|endoftext|>`` (49407)."""
    tokenizer = Path(folder) / "tokenizer"
    pad = None
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if pad is None and (tokenizer / name).is_file():
            pad = json.loads((tokenizer / name).read_text()).get("pad_token")
    if isinstance(pad, dict):  # an AddedToken: {"content": "!", ...}
        pad = pad.get("content")
    if pad is None or not (tokenizer / "vocab.json").is_file():
        return None
    vocab = json.loads((tokenizer / "vocab.json").read_text(encoding="utf-8"))
    added = tokenizer / "added_tokens.json"
    if added.is_file():
        vocab.update(json.loads(added.read_text(encoding="utf-8")))
    if pad not in vocab:
        raise ConfigError(f"{tokenizer}: the pad token {pad!r} is not in vocab.json, so its id is unknown: set "
                          "pad_token in special_tokens_map.json to a vocabulary token (SD 1.x: <|endoftext|>, SD "
                          "2.x: !)")
    return int(vocab[pad])
