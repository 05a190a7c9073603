"""Inpainting: training masks, a 9-channel UNet started from a 4-channel one, the pipeline's mask inputs and their
errors, the shards' own masks, and a few training steps of an inpainting model."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.autoencoder import AutoencoderKL
from ldm.convert import SDCheckpoint, init_from_sd, widen_conv_in
from ldm.data.masks import MaskSettings, binarize, latent_mask, masked_image, random_masks
from ldm.data.transforms import ImageTransform, SampleDecoder
from ldm.diffusion.schedules import SD_SCHEDULE
from ldm.errors import ConfigError
from ldm.pipeline import LatentDiffusionPipeline
from ldm.unet import UNet
from tests.module_factory import diffusion_module
from tests.module_factory import randomize as _randomize
from tests.unit.test_lightning_modules import HashTextEncoder, collate, image_batches, tiny_vae, trainer


def _unet(in_channels: int, seed: int = 1) -> UNet:
    return _randomize(UNet(in_channels, 4, 32, (1, 2), 1, (1, 2), num_heads=2, context_dim=32), seed)


# ----------------------------------------------------------------------------- masks


def test_random_masks_are_binary_seeded_and_keep_the_full_mask_fraction() -> None:
    s = MaskSettings(full_mask_prob=0.3, box_prob=0.5)
    masks = random_masks(600, 16, 24, s, torch.Generator().manual_seed(0))
    assert masks.shape == (600, 1, 16, 24) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    full = (masks.flatten(1).mean(1) == 1).float().mean().item()
    assert abs(full - 0.3) < 4 * (0.3 * 0.7 / 600) ** 0.5  # within 4 standard errors
    partial = masks[masks.flatten(1).mean(1) < 1]
    assert (partial.flatten(1).sum(1) > 0).all()  # boxes and strokes always mask something
    again = random_masks(600, 16, 24, s, torch.Generator().manual_seed(0))
    torch.testing.assert_close(masks, again, rtol=0, atol=0)
    assert not torch.equal(masks, random_masks(600, 16, 24, s, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("box_prob", [0.0, 1.0])
def test_boxes_and_strokes_alone(box_prob: float) -> None:
    s = MaskSettings(full_mask_prob=0.0, box_prob=box_prob, max_boxes=1, box_size=(0.25, 0.5))
    masks = random_masks(50, 32, 32, s, torch.Generator().manual_seed(2))
    covered = masks.flatten(1).mean(1)
    assert ((covered > 0) & (covered < 1)).all()
    if box_prob == 1.0:  # one box of 8..16 pixels a side
        for m in masks[:, 0]:
            rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert 8 <= h <= 16 and 8 <= w <= 16 and m.sum() == h * w


def test_mask_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="full_mask_prob must lie in"):
        MaskSettings(full_mask_prob=1.5)
    with pytest.raises(ConfigError, match="box_size must be"):
        MaskSettings(box_size=(0.5, 0.2))
    with pytest.raises(ConfigError, match="max_strokes must be an integer"):
        MaskSettings(max_strokes=0)


def test_mask_helpers_follow_sd_inpainting() -> None:
    mask = binarize(torch.tensor([[[[0.0, 0.49, 0.5, 1.0]]]]))
    assert mask.tolist() == [[[[0.0, 0.0, 1.0, 1.0]]]]
    image = torch.full((1, 3, 1, 4), 0.7)
    assert masked_image(image, mask)[0, 0, 0].tolist() == pytest.approx([0.7, 0.7, 0.0, 0.0])
    big = torch.zeros(1, 1, 8, 8)
    big[..., :2, :2] = 1  # the top-left pixel of each 2x2 block is what nearest keeps
    assert latent_mask(big, (4, 4))[0, 0].tolist()[0] == [1.0, 0.0, 0.0, 0.0]


def test_shard_masks_follow_the_image_crop_and_flip() -> None:
    def png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    rgb = np.zeros((24, 32, 3), dtype=np.uint8)
    rgb[:, :10] = 255  # white on the left
    mask = np.zeros((24, 32), dtype=np.uint8)
    mask[:, :10] = 255  # the same region
    decoder = SampleDecoder(ImageTransform(size=16, crop="random", hflip=True))
    for seed in range(6):
        out = decoder({"__key__": "k", "png": png(rgb), "mask.png": png(mask), "txt": b"x"}, random.Random(seed))
        assert out["mask"].shape == (1, 16, 16) and out["mask"].dtype == torch.uint8
        assert set(out["mask"].unique().tolist()) <= {0, 255}
        white = out["image"][0] > 127
        assert (white == (out["mask"][0] > 0)).float().mean() > 0.9  # the mask moved with the image
    with pytest.raises(ValueError, match="masks must have the image's size"):
        decoder({"__key__": "k", "png": png(rgb), "mask.png": png(mask[:20])}, random.Random(0))


# ----------------------------------------------------------------------------- 9 channels from 4


def test_a_nine_channel_unet_started_from_four_channels_is_the_base_model() -> None:
    base = _unet(4)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    wide = UNet(9, 4, 32, (1, 2), 1, (1, 2), num_heads=2, context_dim=32).eval()
    loaded = init_from_sd(SDCheckpoint(base, vae, {}), "base.safetensors", wide)
    assert loaded == ["UNet (4 -> 9 input channels, the new ones zeroed)"]
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        expected = base(x, torch.tensor([5, 900]), ctx)
        for _ in range(3):  # whatever the mask and masked image
            concat = torch.cat([(torch.rand(2, 1, 8, 8, generator=g) > 0.5).float(),
                                torch.randn(2, 4, 8, 8, generator=g)], dim=1)
            torch.testing.assert_close(wide(x, torch.tensor([5, 900]), ctx, concat=concat), expected,
                                       rtol=0, atol=0)
    with pytest.raises(ConfigError, match="dropping inputs"):
        widen_conv_in(wide.state_dict(), 4)
    with pytest.raises(ValueError, match="an inpainting UNet: pass the mask"):
        wide(x, 5, ctx)


# ----------------------------------------------------------------------------- pipeline


class FixedText(torch.nn.Module):
    def encode(self, prompts):
        from types import SimpleNamespace

        g = torch.Generator().manual_seed(0)
        return SimpleNamespace(hidden=torch.randn(len(prompts), 5, 32, generator=g))


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return _randomize(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1), 2)


def _pipe(in_channels: int, vae) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline(_unet(in_channels), FixedText(), vae, SD_SCHEDULE, "epsilon",
                                   {"image_size": 16, "num_inference_steps": 3})


def _image_and_mask(size: int = 16):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, : size // 2] = 255
    return image, Image.fromarray(mask)


def test_pipeline_mask_errors_are_clear(vae) -> None:
    inpaint, plain = _pipe(9, vae), _pipe(4, vae)
    image, mask = _image_and_mask()
    with pytest.raises(ConfigError, match="mask_image needs image="):
        inpaint("x", mask_image=mask)
    with pytest.raises(ConfigError, match="mask_image is 8x16 but image is 16x16"):
        inpaint("x", image=image, mask_image=mask.crop((0, 0, 8, 16)))
    with pytest.raises(ConfigError, match="mask_image is 8x8 but image is 16x16"):
        inpaint("x", image=image, mask_image=torch.ones(8, 8))
    with pytest.raises(ConfigError, match="mask_image tensor must have shape"):
        inpaint("x", image=image, mask_image=torch.ones(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="needs an inpainting model.*legacy_inpaint=True"):
        plain("x", image=image, mask_image=mask)
    with pytest.raises(ConfigError, match="give mask_image= with image="):
        inpaint("x", image=image)
    with pytest.raises(ConfigError, match="drop legacy_inpaint"):
        inpaint("x", image=image, mask_image=mask, legacy_inpaint=True)
    with pytest.raises(ConfigError, match="mask_image must be a PIL image or a tensor"):
        inpaint("x", image=image, mask_image="mask.png")


@torch.no_grad()
def test_pipeline_inpaints_with_pil_or_tensor_masks_and_keeps_text_to_image(vae) -> None:
    pipe = _pipe(9, vae)
    image, mask = _image_and_mask()
    kw = dict(output_type="latent", guidance_scale=2.0)
    a = pipe(["x", "y"], image=image, mask_image=mask, generator=torch.Generator().manual_seed(0), **kw)
    tensor_mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)
    b = pipe(["x", "y"], image=image, mask_image=tensor_mask[None, None], generator=torch.Generator().manual_seed(0),
             **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = pipe(["x", "y"], image=image, mask_image=1 - tensor_mask, generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.allclose(a, other)  # the mask reaches the UNet
    assert pipe(["x"], **kw).shape == (1, 4, 8, 8)  # no image: text-to-image, everything repainted


@torch.no_grad()
def test_a_16_bit_mask_or_image_samples_as_its_8_bit_value_as_training_reads_it(vae) -> None:
    """A 16-bit grey mask (PIL ``I;16``) is scaled to 8 bits, as the shard reader does, not clipped at 255 (a value
    of 20000 of 65535 would be white: repainted); so is a 16-bit grey init image."""
    pipe = _pipe(9, vae)
    image, mask = _image_and_mask()
    eight = np.asarray(mask, dtype=np.uint16)
    mask16 = Image.fromarray((eight * 257 // 3).astype(np.uint16))  # I;16: 0 and 21845, all below the threshold
    assert mask16.mode == "I;16"
    kw = dict(output_type="latent", guidance_scale=2.0)
    got = pipe("x", image=image, mask_image=mask16, generator=torch.Generator().manual_seed(0), **kw)
    as_eight = Image.fromarray((eight // 3).astype(np.uint8), "L")
    same = pipe("x", image=image, mask_image=as_eight, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(got, same, rtol=0, atol=0)
    grey = np.asarray(image.convert("L"), dtype=np.uint16)
    with pytest.warns(UserWarning, match="init image has mode I;16"):
        got = pipe("x", image=Image.fromarray(grey * 257), mask_image=mask,
                   generator=torch.Generator().manual_seed(0), **kw)
    with pytest.warns(UserWarning, match="init image has mode L"):
        torch.testing.assert_close(got, pipe("x", image=Image.fromarray(grey.astype(np.uint8), "L"), mask_image=mask,
                                             generator=torch.Generator().manual_seed(0), **kw), rtol=0, atol=0)


@torch.no_grad()
def test_legacy_blend_keeps_the_unmasked_latents(vae) -> None:
    pipe = _pipe(4, vae)
    image, mask = _image_and_mask()
    z = pipe("x", image=image, mask_image=mask, legacy_inpaint=True, output_type="latent", sampler="ddim",
             generator=torch.Generator().manual_seed(0))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    z0 = vae.normalize_latents(vae.encode(x).mode())
    torch.testing.assert_close(z[..., 4:], z0[..., 4:], rtol=0, atol=1e-6)  # the right half is kept
    assert not torch.allclose(z[..., :4], z0[..., :4])


@torch.no_grad()
def test_an_inpainting_model_without_an_image_runs_every_step_from_noise(vae) -> None:
    """Text-to-image on an inpainting model starts from pure noise at the first timestep, whatever ``strength`` says:
    there is no image to noise (the default strength 0.8 used to cut the schedule and start from a black image)."""
    pipe = _pipe(9, vae)
    seen: dict[str, list[int]] = {"default": [], "full": []}
    kw = dict(output_type="latent", guidance_scale=1.0, num_inference_steps=5)
    a = pipe("x", generator=torch.Generator().manual_seed(0), callback=lambda i, t, x, x0: seen["default"].append(t),
             **kw)
    b = pipe("x", generator=torch.Generator().manual_seed(0), strength=1.0,
             callback=lambda i, t, x, x0: seen["full"].append(t), **kw)
    assert len(seen["default"]) == 5 and seen["default"] == seen["full"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_a_tensor_mask_is_resized_with_the_image(vae) -> None:
    """A PIL image of another size than the call's is resized, and its mask with it, a tensor mask as a PIL one."""
    pipe = _pipe(9, vae)
    image, mask = _image_and_mask(32)
    tensor_mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)
    kw = dict(output_type="latent", height=16, width=16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="resized to 16x16"):
        a = pipe("x", image=image, mask_image=mask, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="resized to 16x16"):
        b = pipe("x", image=image, mask_image=tensor_mask, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # a half-image mask: both resize to the same binary mask


@torch.no_grad()
def test_legacy_blend_of_a_flow_model_noises_the_kept_region_by_the_flow_path(vae) -> None:
    """After each step the kept region is the image's latents on the model's own forward path to the next level:
    (1 - s) z0 + s eps for a flow model (alpha z0 + sigma eps, the diffusion formula, is another point)."""
    from ldm.diffusion.sampling import make_scheduler, set_steps

    flow = {"objective": "flow_matching", "num_train_timesteps": 1000, "shift": 3.0, "resolution_shift": False}
    pipe = LatentDiffusionPipeline(_unet(4), FixedText(), vae, flow, "flow", {"image_size": 16,
                                                                            "num_inference_steps": 4})
    image, mask = _image_and_mask()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    frames: list[torch.Tensor] = []
    pipe("x", image=image, mask_image=mask, legacy_inpaint=True, latents=noise, strength=1.0, guidance_scale=1.0,
         output_type="latent", callback=lambda i, t, x, x0: frames.append(x.clone()))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    z0 = vae.normalize_latents(vae.encode(x).mode())
    scheduler = make_scheduler("flow_euler", flow, "flow")
    set_steps(scheduler, 4, (1, 4, 8, 8))
    for i in range(3):
        s = float(scheduler.timesteps[i + 1]) / 1000  # the next level, in (0, 1)
        torch.testing.assert_close(frames[i][..., 4:], ((1 - s) * z0 + s * noise)[..., 4:], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- training


def test_an_inpainting_module_trains_on_drawn_and_given_masks(tmp_path) -> None:
    torch.manual_seed(0)
    unet = UNet(9, 4, 32, (1, 2), 1, (1, 2), num_heads=2, context_dim=32)
    module = diffusion_module(unet, HashTextEncoder(), tiny_vae(), max_steps=4, ema_decay=None,
                              inpainting=MaskSettings(full_mask_prob=0.25))
    assert module.is_inpainting
    batch = collate(image_batches(4))
    g = torch.Generator().manual_seed(0)
    x0 = module.latents_of(batch)
    concat = module.inpaint_condition(batch, x0, g)
    assert concat.shape == (4, 5, 8, 8)
    again = module.inpaint_condition(batch, x0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(concat[:, :1], again[:, :1], rtol=0, atol=0)  # the same masks for the same seed
    full = module.inpaint_condition(batch, x0)  # validation: everything masked
    assert (full[:, 0] == 1).all()
    given = module.inpaint_condition({**batch, "mask": torch.zeros(4, 1, 16, 16, dtype=torch.uint8)}, x0, g)
    assert (given[:, 0] == 0).all()  # the shards' own masks win

    before = unet.input_blocks[0][0].weight[:, 4:].detach().clone()
    trainer(4, tmp_path).fit(module, DataLoader(image_batches(8), batch_size=4, collate_fn=collate))
    assert not torch.equal(unet.input_blocks[0][0].weight[:, 4:], before)  # the mask channels learn
    with torch.no_grad():
        loss = module.loss_fn(lambda x, t, c: module.denoise(x, t, c, None, concat), x0,
                              module.encode_text(batch["caption"]), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    images = module.generate(["a red square"], num_inference_steps=2, height=16, width=16, use_ema=False)
    assert images.shape == (1, 3, 16, 16)  # the training grids sample an inpainting model as text-to-image


def test_a_batch_where_some_samples_carry_a_mask_trains_each_on_its_own_and_the_others_on_drawn_ones() -> None:
    """The shards' own masks are kept when only some samples of a batch have one (collate used to drop them all):
    those samples train on theirs, the others on the masks drawn from the generator (a full mask in validation)."""
    from ldm.data.transforms import collate as collate_samples

    torch.manual_seed(0)
    unet = UNet(9, 4, 32, (1, 2), 1, (1, 2), num_heads=2, context_dim=32)
    settings = MaskSettings(full_mask_prob=0.0)
    module = diffusion_module(unet, HashTextEncoder(), tiny_vae(), max_steps=4, ema_decay=None, inpainting=settings)
    samples = [{k: v[i] if isinstance(v, torch.Tensor | list) else v for k, v in collate(image_batches(4)).items()}
               for i in range(4)]
    for i in (0, 2):
        samples[i]["mask"] = torch.zeros(1, 16, 16, dtype=torch.uint8)  # keep everything
    batch = collate_samples(samples)
    assert batch["mask_given"].tolist() == [True, False, True, False]
    x0 = module.latents_of(batch)
    concat = module.inpaint_condition(batch, x0, torch.Generator().manual_seed(3))
    drawn = latent_mask(random_masks(4, 16, 16, settings, torch.Generator().manual_seed(3)), (8, 8))
    assert (concat[[0, 2], 0] == 0).all()
    torch.testing.assert_close(concat[[1, 3], :1], drawn[[1, 3]], rtol=0, atol=0)
    assert drawn[[1, 3]].sum() > 0
    full = module.inpaint_condition(batch, x0)  # validation
    assert (full[[0, 2], 0] == 0).all() and (full[[1, 3], 0] == 1).all()


# ----------------------------------------------------------------------------- sample.py


def test_sample_cli_inpaints_an_sd_inpainting_file(tmp_path) -> None:
    import importlib.util
    import json

    from hydra import compose, initialize_config_dir

    from ldm.convert import save_state_dict, to_sd_state_dict
    from ldm.text import HFCLIPTextEncoder
    from tests.unit.test_pipeline import HF_TEXT

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("sample_cli_inpaint", root / "sample.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    torch.manual_seed(0)
    unet = _randomize(UNet(9, 4, 32, (1, 2), 1, (1, 2), num_heads=8, context_dim=64), 1)
    vae = _randomize(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1), 2)
    ckpt = tmp_path / "inpaint.safetensors"
    save_state_dict(to_sd_state_dict(unet, vae, HFCLIPTextEncoder(config=HF_TEXT)), ckpt)
    image, mask = _image_and_mask()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")

    def run(**settings):
        overrides = [f"ckpt={ckpt}", f"out={tmp_path / 'out'}", "prompt=x", "steps=2", "height=16", "width=16"]
        overrides += [f"{k}={json.dumps(v) if isinstance(v, str | bool) else v}" for k, v in settings.items()]
        with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
            return cli.run(compose("sample", overrides=overrides))

    with pytest.warns(UserWarning):  # the file records no heads: guessed
        written = run(init_image=str(tmp_path / "in.png"), mask=str(tmp_path / "mask.png"), strength=1.0)
    meta = json.loads(written[0].with_suffix(".json").read_text())
    assert meta["mask"] == str(tmp_path / "mask.png") and meta["legacy_inpaint"] is False
    with pytest.raises(ConfigError, match="give init_image=PATH too"):
        run(mask=str(tmp_path / "mask.png"))
    with pytest.raises(ConfigError, match="is an inpainting model: give mask=PATH"), pytest.warns(UserWarning):
        run(init_image=str(tmp_path / "in.png"))


def test_the_config_block_is_checked_before_training() -> None:
    from hydra import compose, initialize_config_dir

    from ldm.lightning.settings import check_ldm_stage
    from ldm.lightning.stages import inpainting_settings

    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("train")
    check_ldm_stage(cfg.ldm_stage)
    assert inpainting_settings(cfg) == MaskSettings()  # the shipped defaults are the dataclass'
    cfg.ldm_stage.inpainting.full_mask_prob = 2.0
    with pytest.raises(ConfigError, match="full_mask_prob must lie in"):
        check_ldm_stage(cfg.ldm_stage)
    cfg.ldm_stage.inpainting = {"box_chance": 0.5}
    with pytest.raises(ConfigError, match="ldm_stage.inpainting: .*box_chance"):
        check_ldm_stage(cfg.ldm_stage)


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.55), (4, 0.6), (25, 0.3), (8, 0.5), (4, 0.1)])
@torch.no_grad()
def test_a_flow_models_image_to_image_runs_the_timesteps_of_diffusers_sd3_img2img(vae, steps, strength) -> None:
    """Flow models count image-to-image's steps as diffusers' SD3 and Flux img2img pipelines do
    (``steps - int(steps - steps * strength)``, one more than SD's ``int(steps * strength)`` where the product is
    not whole): the timesteps run are ``StableDiffusion3Img2ImgPipeline.get_timesteps``' on the same schedule."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline

    flow = {"objective": "flow_matching", "num_train_timesteps": 1000, "shift": 3.0, "resolution_shift": False}
    pipe = LatentDiffusionPipeline(_unet(4), FixedText(), vae, flow, "flow", {"image_size": 16,
                                                                            "num_inference_steps": steps})
    image, _ = _image_and_mask()
    ran: list[float] = []
    pipe("x", image=image, strength=strength, guidance_scale=1.0, output_type="latent",
         callback=lambda i, t, x, x0: ran.append(float(t)))
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    reference.set_timesteps(steps)
    expected, _ = StableDiffusion3Img2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=reference), steps,
                                                                strength, "cpu")
    assert ran == pytest.approx([float(t) for t in expected], rel=1e-5)
