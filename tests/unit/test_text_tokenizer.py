"""CLIP tokenizer (against open_clip.tokenize) and CFG caption dropout."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ldm.text import CLIPTokenizer, drop_captions  # noqa: E402
from ldm.text.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID  # noqa: E402

PROMPTS = ["a photo of a cat", "", "A RED Circle, on the left!!  ", "naïve café 123 don't", "word " * 100]


def test_ids_match_open_clip_tokenize():
    import open_clip

    with pytest.warns(UserWarning, match="prompt 4"):
        ids, mask = CLIPTokenizer()(PROMPTS)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (len(PROMPTS), 77)
    assert torch.equal(ids, open_clip.tokenize(PROMPTS))
    assert mask.sum(1).tolist() == [int((row != 0).sum()) for row in ids]


def test_ids_match_open_clip_tokenize_in_a_process_without_open_clips_package():
    """A fresh process loads open_clip's tokenizer module from its file, not through the package (whose __init__
    imports open_clip's models, torchvision and transformers): the same ids, none of those imports."""
    import open_clip

    code = ("import json, sys; from ldm.text import CLIPTokenizer; ids, _ = CLIPTokenizer()(json.loads(sys.argv[1])); "
            "print(json.dumps([ids.tolist(), [m for m in ('open_clip', 'torchvision', 'transformers') "
            "if m in sys.modules]]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(PROMPTS[:4])], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids, imported = json.loads(proc.stdout.splitlines()[-1])
    assert imported == []
    assert torch.equal(torch.tensor(ids), open_clip.tokenize(PROMPTS[:4]))


def test_a_tokenizer_module_that_needs_its_package_is_imported_the_ordinary_way(tmp_path, monkeypatch):
    """Where a release of open_clip gives tokenizer.py a relative import, the file cannot load on its own: the
    loader then imports ``open_clip.tokenizer`` as usual, and leaves no half-loaded module behind."""
    import importlib
    import importlib.util
    import types

    from ldm.text import tokenizer

    package = tmp_path / "open_clip"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tokenizer.py").write_text("from .constants import X\n")
    ordinary = types.ModuleType("open_clip.tokenizer")
    monkeypatch.delitem(sys.modules, "open_clip", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]))
    monkeypatch.setattr(importlib, "import_module", lambda name: ordinary if name == "open_clip.tokenizer" else None)
    assert tokenizer._open_clip_tokenizer_module() is ordinary
    assert "_ldm_open_clip_tokenizer" not in sys.modules


def test_layout_mask_and_pad_id():
    tok = CLIPTokenizer(context_length=16, pad_token_id=EOT_TOKEN_ID)
    ids, mask = tok(["a cat", ""])
    body = tok.encode("a cat")
    n = len(body) + 2
    assert ids[0, :n].tolist() == [SOT_TOKEN_ID, *body, EOT_TOKEN_ID]
    assert (ids[0, n:] == EOT_TOKEN_ID).all()  # HF-style padding with the end token
    assert mask[0].tolist() == [True] * n + [False] * (16 - n)
    assert ids[1, :2].tolist() == [SOT_TOKEN_ID, EOT_TOKEN_ID] and mask[1].sum() == 2
    zero_pad, _ = CLIPTokenizer(context_length=16)(["a cat"])
    assert (zero_pad[0, n:] == 0).all()
    assert tok.decode(ids[0]) == "a cat"


def test_truncation_warns_with_count_and_prompt():
    tok = CLIPTokenizer(context_length=8)
    with pytest.warns(UserWarning, match=r"prompt 1 'one two three four five six seven eight': dropped 2 of 8 tokens"):
        ids, mask = tok(["short", "one two three four five six seven eight"])
    assert ids[1, -1] == EOT_TOKEN_ID and mask[1].all()
    assert tok.decode(ids[1]) == "one two three four five six"


def test_no_warning_at_exact_fit(recwarn):
    CLIPTokenizer(context_length=8)(["one two three four five six"])
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_tokenizer_errors():
    tok = CLIPTokenizer()
    with pytest.raises(ValueError, match="empty list"):
        tok([])
    with pytest.raises(TypeError, match="list of prompts"):
        tok("a cat")
    with pytest.raises(ValueError, match="context_length"):
        CLIPTokenizer(context_length=1)


def test_caption_dropout_rate_and_determinism():
    captions = [f"caption {i}" for i in range(20000)]
    out = drop_captions(captions, p=0.1, generator=torch.Generator().manual_seed(0))
    rate = sum(c == "" for c in out) / len(out)
    assert abs(rate - 0.1) < 0.01  # ~4.7 standard deviations
    assert all(c in ("", orig) for c, orig in zip(out, captions, strict=True))
    again = drop_captions(captions, p=0.1, generator=torch.Generator().manual_seed(0))
    assert out == again
    assert drop_captions(captions[:5], p=0.0) == captions[:5]
    assert drop_captions(captions[:5], p=1.0) == [""] * 5


def test_caption_dropout_is_seeded_and_checks_its_input():
    caps = [str(i) for i in range(64)]
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert drop_captions(caps, 0.5, a) == drop_captions(caps, 0.5, b)  # same stream, call after call
    assert drop_captions(caps, 0.5, a) == drop_captions(caps, 0.5, b)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_captions(caps, p=1.5)
    with pytest.raises(TypeError):
        drop_captions("a cat", p=0.1)
