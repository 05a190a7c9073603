"""trainer.precision=auto: bf16-mixed on a CPU with native bf16, 32-true elsewhere; other values pass through."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ldm.lightning import precision, stages


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_mixed_exactly_on_a_cpu_with_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    want = "bf16-mixed" if native else "32-true"
    assert precision.resolve_precision("auto", "cpu") == want
    assert precision.resolve_precision("auto", "auto") == want  # no CUDA device: the run trains on the CPU
    assert precision.resolve_precision("auto", "gpu") == "32-true"


def test_auto_keeps_float32_when_auto_picks_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.resolve_precision("auto", "auto") == "32-true"
    assert precision.resolve_precision("auto", "cpu") == "bf16-mixed"


@pytest.mark.parametrize("value", ["32-true", "bf16-mixed", "16-mixed", 32, None])
def test_other_precisions_pass_through(value: object) -> None:
    assert precision.resolve_precision(value, "cpu") == value


def test_native_cpu_bf16_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for avx512_bf16, amx, want in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert precision.native_cpu_bf16() is want


@pytest.mark.parametrize("native", [True, False])
def test_the_stage_trainer_resolves_auto(monkeypatch: pytest.MonkeyPatch, tmp_path, native: bool) -> None:
    """make_trainer hands Lightning the resolved precision: autocast to bf16 on a native-bf16 CPU, none elsewhere."""
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: native)
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": 1, "precision": "auto",
                                        "enable_progress_bar": False}})
    trainer = stages.make_trainer(cfg, tmp_path, max_steps=1, callbacks=[], logger=False)
    assert trainer.precision == ("bf16-mixed" if native else "32-true")


@pytest.mark.parametrize(("value", "dtype"), [
    ("bf16-mixed", "bfloat16"), ("bf16-true", "bfloat16"), ("bf16", "bfloat16"), ("16-mixed", "float16"),
    ("16-true", "float16"), (16, "float16"), ("32-true", "float32"), (32, "float32"), ("64-true", "float32"),
    (None, "float32"),
])
def test_autocast_precision_names_the_dtype_a_frozen_forward_runs_in(value: object, dtype: str) -> None:
    assert precision.autocast_precision(value) == dtype
