"""A LoRA run end to end: a tiny base model, exported as an SD single file, fine-tuned with ldm_stage.lora.rank=4;
only the adapters train and are saved (with the base file's path and hash); sampling through from_checkpoint and
sample.py lora=; a missing or changed base file is a clear error (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import file_sha256, load_parts, read_checkpoint
from ldm.convert import load_sd_checkpoint, save_state_dict, to_sd_state_dict
from ldm.errors import ConfigError
from ldm.lora import lora_layers
from ldm.pipeline import LatentDiffusionPipeline
from tests.integration.tiny_run import ROOT, run_train, train_env

pytest.importorskip("peft")

PROMPTS = ["a red circle in the top left", "a blue square in the center"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lora")
    run_train(tmp, "vae_stage.max_steps=1", "ldm_stage.max_steps=1", run_dir=tmp / "base")
    # the base as an SD single file (the LoRA run's init_ckpt); the from-scratch text tower under its own names
    base = load_parts(tmp / "base" / "ldm" / "checkpoints" / "last.ckpt")
    state = to_sd_state_dict(base.unet, base.first_stage, base.text_encoder.state_dict())
    state["scale_factor"] = torch.tensor(base.first_stage.config["scale_factor"])
    base_file = tmp / "base.safetensors"
    save_state_dict(state, base_file)
    # proj as well: a barely trained base has proj_out near its zero init, which hides attention-only adapters
    run_train(tmp, "stages=[ldm]", f"+init_ckpt={base_file}", "ldm_stage.lora.rank=4", "ldm_stage.lora.alpha=8",
              "ldm_stage.lora.targets=[attention,proj]", "ldm_stage.max_steps=4", "optimizer.lr=1e-2",
              run_dir=tmp / "lora")
    lora = tmp / "lora" / "ldm"
    return {"tmp": tmp, "base": tmp / "base" / "ldm" / "checkpoints" / "last.ckpt", "base_file": base_file,
            "lora": lora / "checkpoints" / "last.ckpt", "export": lora / "lora.safetensors"}


def _images(pipe: LatentDiffusionPipeline) -> torch.Tensor:
    return pipe(PROMPTS, num_inference_steps=2, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                output_type="tensor")


def test_the_checkpoint_holds_only_adapters_and_the_base_reference(runs) -> None:
    ckpt = read_checkpoint(runs["lora"])
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert all(k.startswith("unet.") for k in keys)  # the text encoder stays frozen without lora.text_encoder
    lora = ckpt["ldm"]["lora"]
    assert lora["base"] == {"path": str(runs["base_file"].resolve()), "sha256": file_sha256(runs["base_file"])}
    assert set(lora["unet"]["alphas"].values()) == {8.0} and lora.get("text_encoder") is None
    assert ckpt["ldm"]["ema"] is False
    assert runs["lora"].stat().st_size < runs["base"].stat().st_size / 3
    assert runs["export"].is_file()


def test_only_the_adapters_trained(runs) -> None:
    pipe = LatentDiffusionPipeline.from_checkpoint(runs["lora"])
    base = load_sd_checkpoint(runs["base_file"], unet_kwargs={"num_heads": 2})
    layers = lora_layers(pipe.unet)
    assert layers
    for name, layer in layers.items():  # base weights unchanged, adapters moved away from B = 0
        torch.testing.assert_close(layer.get_base_layer().weight, base.unet.get_submodule(name).weight)
        assert layer.lora_B["default"].weight.abs().max() > 0
    plain = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    want = {k.replace(".base_layer", ""): v for k, v in plain.items()}
    for k, v in base.unet.state_dict().items():
        torch.testing.assert_close(want[k], v)


def test_sampling_through_from_checkpoint_and_sample_py(runs, tmp_path: Path) -> None:
    adapted = _images(LatentDiffusionPipeline.from_checkpoint(runs["lora"]))
    plain = LatentDiffusionPipeline.from_checkpoint(runs["base"])
    base_images = _images(plain)
    assert (adapted - base_images).abs().max() > 1e-3  # the adapters change the samples
    torch.testing.assert_close(_images(plain.load_lora(runs["export"])), adapted, atol=1e-5, rtol=1e-5)
    from_run = LatentDiffusionPipeline.from_checkpoint(runs["base"]).load_lora(runs["lora"])  # a run's adapters
    torch.testing.assert_close(_images(from_run), adapted, atol=1e-5, rtol=1e-5)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={runs['base']}", f"lora={runs['export']}",
                           "lora_scale=0.5", "prompt=a red circle", "steps=2", f"out={out}"],
                          cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "00000.png").is_file() and '"lora_scale": 0.5' in (out / "00000.json").read_text()


def test_converting_a_lora_run_merges_its_adapters(runs, tmp_path: Path, capsys) -> None:
    """``python -m ldm.convert`` on a LoRA run writes the adapted model with plain weights (diffusers folders and SD
    files hold no adapters): diffusers' own loader reads the folder's UNet, and it computes what the run's does."""
    from diffusers import UNet2DConditionModel

    from ldm.convert.__main__ import main as convert_main

    assert convert_main([str(runs["lora"]), str(tmp_path / "merged")]) == 0
    assert "adapters are merged into the base weights" in capsys.readouterr().err
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet").eval()
    ours = load_parts(runs["lora"]).unet.eval()
    assert lora_layers(ours)  # the run's UNet, adapters unmerged
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, ours.in_channels, 4, 4, generator=g), torch.tensor([10, 700])
    context = torch.randn(2, 12, ours.context_dim, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, encoder_hidden_states=context).sample, ours(x, t, context),
                                   rtol=1e-4, atol=1e-5)


def test_a_missing_or_changed_base_file_is_a_clear_error(runs, tmp_path: Path) -> None:
    original = runs["base_file"].read_bytes()
    try:
        runs["base_file"].write_bytes(original + b"\0")
        with pytest.raises(ConfigError, match="has changed.*restore the original base file"):
            load_parts(runs["lora"])
        runs["base_file"].unlink()
        proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={runs['lora']}", "prompt=x",
                               "steps=1", f"out={tmp_path / 'out'}"], cwd=tmp_path, env=train_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        runs["base_file"].write_bytes(original)
