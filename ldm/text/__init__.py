"""Text conditioning: CLIP tokenizer, text encoders (open_clip, transformers, from scratch) and caption dropout.

The encoder classes are imported lazily so that ``import ldm.text`` does not pull in transformers or open_clip
until a back end is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ldm.text.base import TextEncoder, TextEncoding
from ldm.text.conditioner import drop_captions
from ldm.text.tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    from ldm.text.hf_encoder import HFCLIPTextEncoder
    from ldm.text.openclip_encoder import OpenCLIPTextEncoder
    from ldm.text.scratch import ScratchTextEncoder

_LAZY = {
    "HFCLIPTextEncoder": "ldm.text.hf_encoder",
    "OpenCLIPTextEncoder": "ldm.text.openclip_encoder",
    "ScratchTextEncoder": "ldm.text.scratch",
}

__all__ = [
    "CLIPTokenizer",
    "HFCLIPTextEncoder",
    "OpenCLIPTextEncoder",
    "ScratchTextEncoder",
    "TextEncoder",
    "TextEncoding",
    "drop_captions",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm.text' has no attribute {name!r}")
