"""Fine-tuning a trained ldm checkpoint through train.py: init_ckpt takes an ldm checkpoint directly; the
quickstart_inpaint and quickstart_lora presets train on it (tiny models); a LoRA run resumed mid-way gives the
adapters of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint import file_sha256, load_init_checkpoint, load_parts, read_checkpoint
from ldm.errors import ConfigError
from ldm.pipeline import LatentDiffusionPipeline
from tests.integration.tiny_run import run_train

pytest.importorskip("peft")

LORA = ("stages=[ldm]", "ldm_stage.lora.rank=4", "ldm_stage.lora.targets=[attention,proj]", "optimizer.lr=1e-2",
        "ldm_stage.lr_schedule=constant")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("base")
    run_train(tmp, "vae_stage.max_steps=1", "ldm_stage.max_steps=2", run_dir=tmp / "base")
    return tmp / "base" / "ldm" / "checkpoints" / "last.ckpt"


def test_load_init_checkpoint_reads_an_ldm_checkpoint_as_its_ema_parts(base, tmp_path) -> None:
    init = load_init_checkpoint(base)
    parts = load_parts(base)  # EMA weights in the UNet
    for a, b in ((init.unet, parts.unet), (init.vae, parts.first_stage)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(x, y, msg=name)
    assert set(init.cond_stage_state_dict) == set(parts.text_encoder.state_dict())
    assert init.scale_factor == parts.first_stage.config["scale_factor"] and init.prediction_type == "v_prediction"
    vae_only = base.parents[2] / "vae" / "vae.ckpt"
    with pytest.raises(ConfigError, match="autoencoder.*vae_ckpt="):
        load_init_checkpoint(vae_only)
    with pytest.raises(ConfigError, match="no such file"):
        load_init_checkpoint(tmp_path / "missing.ckpt")


def test_quickstart_inpaint_trains_a_nine_channel_unet_from_an_ldm_checkpoint(base, tmp_path) -> None:
    from ldm.eval.shapes_inpaint import evaluate

    run_train(tmp_path, "experiment=quickstart_inpaint", f"init_ckpt={base}", "ldm_stage.max_steps=2",
              run_dir=tmp_path / "inpaint")
    ckpt = tmp_path / "inpaint" / "ldm" / "checkpoints" / "last.ckpt"
    pipe = LatentDiffusionPipeline.from_checkpoint(ckpt)
    assert pipe.is_inpainting and pipe.unet.in_channels == 9
    header = read_checkpoint(ckpt)["ldm"]
    assert header["config"]["init_ckpt"] == str(base)
    # the four latent channels started from the base's EMA weights; the five new ones from zero, then trained
    r = evaluate(pipe, n=4, batch=4, steps=2)
    assert r["n"] == 4 and 0 <= r["full"] <= 1 and 0 <= r["kept"]["within"] <= 1 and r["vae_floor"] is not None


def test_quickstart_lora_trains_adapters_on_an_ldm_checkpoint_with_the_extra_colour(base, tmp_path) -> None:
    # proj too, no warm-up and a high rate: on a barely trained base, proj_out near its zero init hides attention-only
    # adapters after two steps
    run_train(tmp_path, "experiment=quickstart_lora", f"init_ckpt={base}", "ldm_stage.max_steps=2",
              "ldm_stage.warmup_steps=0", "optimizer.lr=1e-2", "ldm_stage.lora.targets=[attention,proj]",
              run_dir=tmp_path / "lora")
    ckpt = read_checkpoint(tmp_path / "lora" / "ldm" / "checkpoints" / "last.ckpt")
    lora = ckpt["ldm"]["lora"]
    assert lora["base"] == {"path": str(base.resolve()), "sha256": file_sha256(base)}
    assert all(".lora_" in k for k in ckpt["state_dict"]) and ckpt["ldm"]["config"]["ldm_stage"]["lora"]["rank"] == 4
    index = (tmp_path / "shards" / "index.json").read_text()
    assert index  # the preset's dataset (with cyan) was written
    import tarfile

    captions = []
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert any(" cyan " in c for c in captions)
    # sampling rebuilds the base from the ldm checkpoint and puts the adapters on it
    pipe = LatentDiffusionPipeline.from_checkpoint(tmp_path / "lora" / "ldm" / "checkpoints" / "last.ckpt")
    plain = LatentDiffusionPipeline.from_checkpoint(base)
    gen = [torch.Generator().manual_seed(0)]
    a = pipe(["a cyan circle in the center"], num_inference_steps=2, generator=gen, output_type="tensor")
    b = plain(["a cyan circle in the center"], num_inference_steps=2, generator=[torch.Generator().manual_seed(0)],
              output_type="tensor")
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_resumed_lora_run_continues_exactly(base, tmp_path, dropout) -> None:
    """With adapter dropout too: it draws from torch's global generator, which the checkpoint now keeps (a resume
    re-seeded it and trained other adapters)."""
    common = (*LORA, f"+init_ckpt={base}", f"ldm_stage.lora.dropout={dropout}")
    run_train(tmp_path, *common, "ldm_stage.max_steps=4", run_dir=tmp_path / "whole")
    run_train(tmp_path, *common, "ldm_stage.max_steps=2", run_dir=tmp_path / "split")
    run_train(tmp_path, *common, "ldm_stage.max_steps=4", "resume=last", run_dir=tmp_path / "split")
    whole = read_checkpoint(tmp_path / "whole" / "ldm" / "checkpoints" / "last.ckpt")
    split = read_checkpoint(tmp_path / "split" / "ldm" / "checkpoints" / "last.ckpt")
    assert split["global_step"] == whole["global_step"] == 4
    assert set(split["state_dict"]) == set(whole["state_dict"])
    for name, value in whole["state_dict"].items():
        torch.testing.assert_close(split["state_dict"][name], value, msg=name)
    start = read_checkpoint(base)["state_dict"]
    moved = [k for k in whole["state_dict"] if "lora_B" in k and whole["state_dict"][k].abs().max() > 0]
    assert moved and all(not k.startswith("ema.") for k in whole["state_dict"]) and start


def test_a_lora_run_on_a_scratch_text_encoder_merges_into_a_full_ldm_checkpoint(base, tmp_path, capsys) -> None:
    """A LoRA checkpoint cannot be an init_ckpt (it holds adapters only) and its error says to merge it first; with
    a from-scratch text encoder no SD file or diffusers folder holds it, so ``--to ldm`` is the way: the merged
    checkpoint samples as the LoRA run does and starts a new run."""
    from ldm.convert.__main__ import main as convert_main

    run_train(tmp_path, *LORA, f"+init_ckpt={base}", "ldm_stage.max_steps=2", run_dir=tmp_path / "lora")
    lora = tmp_path / "lora" / "ldm" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="merge the adapters into a full model first"):
        load_init_checkpoint(lora)
    assert convert_main([str(lora), str(tmp_path / "merged.ckpt"), "--to", "ldm"]) == 0
    merged = read_checkpoint(tmp_path / "merged.ckpt")
    assert "lora" not in merged["ldm"] and not any("lora_" in k for k in merged["state_dict"])
    prompt, gen = ["a red circle in the center"], lambda: [torch.Generator().manual_seed(0)]
    a = LatentDiffusionPipeline.from_checkpoint(lora)(prompt, num_inference_steps=2, generator=gen(),
                                                      output_type="tensor")
    b = LatentDiffusionPipeline.from_checkpoint(tmp_path / "merged.ckpt")(prompt, num_inference_steps=2,
                                                                          generator=gen(), output_type="tensor")
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    assert load_init_checkpoint(tmp_path / "merged.ckpt").unet is not None
    assert convert_main([str(tmp_path / "merged.ckpt"), str(tmp_path / "again.ckpt"), "--to", "ldm"]) == 2
    assert "already an ldm checkpoint" in capsys.readouterr().err
