"""Fuzzing the input checks: whatever a caller passes (zeros, negatives, NaN, inf, huge numbers, strings, None,
bools, empty lists), the pipeline, ``sample.py``'s config checks and ``ldm.viz``'s parser either give a result
(finite pixels) or raise ConfigError naming the problem: never another exception, never NaN output."""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from PIL import Image

from ldm.autoencoder import AutoencoderKL
from ldm.diffusion.schedules import SD_SCHEDULE
from ldm.errors import ConfigError
from ldm.pipeline import LatentDiffusionPipeline
from ldm.unet import UNet
from ldm.viz import parse_args

ROOT = Path(__file__).resolve().parents[2]
# deterministic for CI; no "explain" phase: re-running a failure many times over would take minutes
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
HF_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
               max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # resized init images, ignored eta, ...

NAN, INF = float("nan"), float("inf")
ADVERSARIAL = st.sampled_from([0, -1, -8, 0.0, -0.5, NAN, INF, -INF, 10**9, 2**70, 1e300, -1e300, "5", "", "nan",
                               None, True, False, [], [1], [NAN, 1], (0, INF), 2.5, b"x", {"a": 1}])

# values no argument takes (a string is a valid prompt: NEVER_VALID_TEXT leaves the strings out)
NEVER_VALID_TEXT = st.sampled_from([NAN, INF, -INF, True, False, b"x", {"a": 1}, [NAN, 1], (0, INF)])
NEVER_VALID = st.one_of(NEVER_VALID_TEXT, st.sampled_from(["5", "nan", "1e3"]))


def _pipeline() -> LatentDiffusionPipeline:
    from ldm.text import HFCLIPTextEncoder

    torch.manual_seed(0)
    text = HFCLIPTextEncoder(config=HF_TEXT)
    unet = UNet(4, 4, 32, (1, 2), 1, (1,), num_heads=4, context_dim=32)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*unet.parameters(), *vae.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return LatentDiffusionPipeline(unet.eval(), text.eval(), vae.eval(), SD_SCHEDULE, "epsilon",
                                   {"image_size": 8, "num_inference_steps": 2})


@pytest.fixture(scope="module")
def pipe() -> LatentDiffusionPipeline:
    return _pipeline()


def _assert_finite_result(result, output_type: str, n: int) -> None:
    if output_type == "pil":
        assert isinstance(result, list) and len(result) == n
        assert all(isinstance(im, Image.Image) and np.isfinite(np.asarray(im, dtype=np.float32)).all()
                   for im in result)
    else:
        assert isinstance(result, torch.Tensor) and result.shape[0] == n and torch.isfinite(result).all()


def _call(pipe: LatentDiffusionPipeline, kwargs: dict) -> None:
    """Call the pipeline: a finite result of the right size, or a ConfigError; anything else fails the test."""
    try:
        result = pipe(**kwargs)
    except ConfigError as err:
        assert str(err)  # a message that names the problem
        return
    prompts = [kwargs["prompt"]] if isinstance(kwargs["prompt"], str) else kwargs["prompt"]
    _assert_finite_result(result, kwargs.get("output_type", "pil"), len(prompts) * kwargs.get("num_images_per_prompt",
                                                                                              1))


# ----------------------------------------------------------------------------- the pipeline

VALID = {
    "prompt": st.one_of(st.just("a cat"), st.lists(st.text(max_size=8), min_size=1, max_size=2)),
    "negative_prompt": st.one_of(st.none(), st.just("blurry")),
    "num_inference_steps": st.sampled_from([None, 1, 2, 3]),
    "guidance_scale": st.one_of(st.none(), st.floats(0, 20)),
    "height": st.sampled_from([None, 8, 16]),
    "width": st.sampled_from([None, 8, 16]),
    "num_images_per_prompt": st.sampled_from([1, 2]),
    "sampler": st.sampled_from([None, "ddim", "ddpm", "dpm_solver++"]),
    "eta": st.floats(0, 1),
    "strength": st.floats(0.01, 1),
    "guidance_rescale": st.one_of(st.none(), st.floats(0, 1)),
    "guidance_interval": st.one_of(st.none(), st.tuples(st.integers(0, 500), st.integers(500, 1200))),
    "autoguidance_scale": st.sampled_from([None, 1, 1.0]),
    "output_type": st.sampled_from(["pil", "tensor", "latent"]),
    "dtype": st.sampled_from([None, "fp32", "bf16", torch.float32]),
    "vae_tile_size": st.sampled_from([None, 2, 4, 64]),
}
# wrong values that are not in ADVERSARIAL's list, per argument
WRONG = {
    "sampler": st.sampled_from(["euler_x", "DDIM", ["ddim"], "flow_euler"]),  # flow_euler: a flow model's only
    "output_type": st.sampled_from(["numpy", "PIL", ["pil"]]),
    "dtype": st.sampled_from(["int8", torch.int64, "bf 16"]),
    "height": st.integers(-20, 20),
    "width": st.sampled_from([7, 12, 17, 16384 + 4]),
    "num_inference_steps": st.sampled_from([1001, 3.0]),
    "guidance_interval": st.tuples(st.integers(-5, 1200), st.integers(-5, 1200)),
    "vae_tile_size": st.integers(-2, 1),
    "negative_prompt": st.sampled_from([["a", "b", "c"], [1]]),
    "prompt": st.sampled_from([[], [None], ("a", 3)]),
}


def _image(kind: str):
    return {"none": None, "pil": Image.new("RGB", (12, 20), (200, 30, 30)), "gray": Image.new("L", (8, 8), 100),
            "tensor": torch.zeros(3, 8, 8), "bad_tensor": torch.full((1, 3, 8, 8), NAN), "str": "in.png"}[kind]


@settings(FUZZ, max_examples=40)
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_valid_arguments_give_finite_images(pipe, data, seed) -> None:
    """Every combination of valid values samples (the only refusals: an image tensor of the wrong size)."""
    kwargs = {k: data.draw(v, label=k) for k, v in VALID.items()}
    kwargs["image"] = _image(data.draw(st.sampled_from(["none", "none", "pil", "gray", "tensor"]), label="image"))
    kwargs["generator"] = torch.Generator().manual_seed(seed)
    try:
        result = pipe(**kwargs)
    except ConfigError as err:  # an image tensor must already have the call's size
        assert isinstance(kwargs["image"], torch.Tensor) and (kwargs["height"], kwargs["width"]) != (8, 8)
        assert "image tensor must have shape" in str(err)
        return
    prompts = [kwargs["prompt"]] if isinstance(kwargs["prompt"], str) else kwargs["prompt"]
    _assert_finite_result(result, kwargs["output_type"], len(prompts) * kwargs["num_images_per_prompt"])


@pytest.mark.parametrize("key", sorted(VALID) + ["image", "generator", "latents", "callback", "class_labels",
                                                 "vae_tile_overlap"])
@settings(FUZZ, max_examples=12)
@given(data=st.data())
def test_one_wrong_argument_is_a_config_error(pipe, data, key) -> None:
    """One argument adversarial, the rest valid: a ConfigError (or, for a value that happens to be valid, images)."""
    kwargs = {k: data.draw(v, label=k) for k, v in VALID.items()}
    kwargs["generator"] = torch.Generator().manual_seed(0)
    wrong = st.one_of(ADVERSARIAL, WRONG[key]) if key in WRONG else ADVERSARIAL
    if key == "image":
        wrong = st.one_of(wrong, st.sampled_from(["tensor", "bad_tensor", "str"]).map(_image))
    if key == "latents":
        wrong = st.one_of(wrong, st.sampled_from([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 4, 4), INF)]))
    if data.draw(st.booleans(), label="never valid"):  # these must be refused, whatever the argument
        kwargs[key] = data.draw(NEVER_VALID_TEXT if key in ("prompt", "negative_prompt") else NEVER_VALID, label=key)
        with pytest.raises(ConfigError, match=key.split("_")[0] if key != "latents" else "latents"):
            pipe(**kwargs)
        return
    kwargs[key] = data.draw(wrong, label=key)
    _call(pipe, kwargs)


@FUZZ
@given(data=st.data())
def test_any_mix_of_arguments_is_a_result_or_a_config_error(pipe, data) -> None:
    kwargs = {k: data.draw(st.one_of(v, ADVERSARIAL, WRONG.get(k, ADVERSARIAL)), label=k) for k, v in VALID.items()}
    kwargs["generator"] = torch.Generator().manual_seed(0)
    _call(pipe, kwargs)


# ----------------------------------------------------------------------------- sample.py


def _load_sample_module():
    spec = importlib.util.spec_from_file_location("sample_cli_fuzz", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample_cli = _load_sample_module()
SAMPLE_KEYS = ["steps", "guidance_scale", "guidance_rescale", "guidance_interval", "autoguidance_scale", "sampler",
               "eta", "seed", "height", "width", "strength", "n", "batch_size", "dtype", "vae_tile_size", "gif",
               "use_ema", "prompt", "negative_prompt", "init_image"]
# values as typed on the command line (Hydra's grammar parses them: numbers, nan, inf, null, lists, strings)
SAMPLE_VALUES = ["0", "-1", "1", "2", "3", "4", "8", "16", "17", "0.5", "1.5", "3.0", "nan", "inf", "-inf", "1e309",
                 "1e300", "99999999999", "18446744073709551615", "abc", "''", "true", "false", "null", "[]", "[1]",
                 "[400,1000]", "[0,inf]", "[nan,1]", "ddim", "euler", "bf16", "int8"]


@pytest.fixture(scope="module")
def sample_env(tmp_path_factory):
    """A stand-in checkpoint file (check_config only checks it exists; the tiny pipeline plays it), an init image."""
    tmp = tmp_path_factory.mktemp("fuzz_sample")
    (tmp / "model.ckpt").write_bytes(b"")
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp / "init.png")
    return tmp


@settings(FUZZ, max_examples=40)
@given(overrides=st.dictionaries(st.sampled_from(SAMPLE_KEYS), st.sampled_from(SAMPLE_VALUES), min_size=1,
                                 max_size=3))
def test_sample_overrides_are_checked_before_anything_is_written(pipe, sample_env, overrides) -> None:
    """Every override is checked (check_config, then the pipeline's check_call through sample_settings) before the
    output folder is made; what passes samples finite images with those settings."""
    if overrides.get("init_image") not in (None, "null"):
        overrides["init_image"] = str(sample_env / "init.png")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        args = [f"ckpt={sample_env / 'model.ckpt'}", f"out={out}", "prompt=a red circle"]
        args += [f"{k}={v}" for k, v in overrides.items()]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            try:
                cfg = compose("sample", overrides=args)
            except HydraException:  # Hydra's own refusal (e.g. prompt=[]: a list where it wants one): not ours
                reject()
        try:
            prompts = sample_cli.check_config(cfg)
            s = sample_cli.sample_settings(cfg, pipe, prompts)
        except ConfigError:
            assert not out.exists()
            return
        assert not out.exists()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs = dict(negative_prompt=cfg.negative_prompt, num_inference_steps=s["num_inference_steps"],
                          guidance_scale=s["guidance_scale"], guidance_rescale=s["guidance_rescale"],
                          guidance_interval=s["guidance_interval"], autoguidance_scale=s["autoguidance_scale"],
                          sampler=s["sampler"], eta=s["eta"], height=s["height"], width=s["width"], dtype=cfg.dtype,
                          vae_tile_size=s["vae_tile_size"], generator=[torch.Generator().manual_seed(cfg.seed)])
            if cfg.init_image:
                kwargs.update(image=Image.open(cfg.init_image), strength=s["strength"])
            try:
                images = pipe(prompts[:1], **kwargs)
            except ConfigError as err:  # only an overflowing result may still be refused
                assert "NaN or inf" in str(err)
                return
        _assert_finite_result(images, "pil", 1)


# ----------------------------------------------------------------------------- ldm.viz

VIZ_KEYS = ["image", "schedule", "out", "size", "seed", "shedule", "sze", "", "OUT"]
VIZ_VALUES = ["", "0", "-1", "8", "16", "4097", "1e2", "nan", "inf", "abc", "linear", "cosine", "linaer",
              "squaredcos_cap_v2", "x.png", "x.xyz", "/no/such/dir/x.png", "/no/such/image.png", "=", "8=8"]


@FUZZ
@given(command=st.sampled_from(["forward", "logsnr", "forwrd", "", "-h"]),
       args=st.lists(st.one_of(st.tuples(st.sampled_from(VIZ_KEYS), st.sampled_from(VIZ_VALUES)).map("=".join),
                               st.sampled_from(["size", "schedule", "=", ""])), max_size=4))
def test_viz_arguments_parse_or_are_config_errors(command, args) -> None:
    try:
        parsed_command, parsed = parse_args([command, *args])
    except ConfigError as err:
        assert str(err)
        return
    assert parsed_command == command
    given_keys = {a.split("=", 1)[0] for a in args}
    assert set(parsed) == ({"out"} if command == "logsnr" else {"image", "schedule", "out", "size", "seed"})
    assert given_keys <= set(parsed)  # no key was dropped
    if command == "forward":
        assert isinstance(parsed["size"], int) and 1 <= parsed["size"] <= 4096
        assert isinstance(parsed["seed"], int) and parsed["seed"] >= 0
        for a in args:  # every value given is the value used
            key, _, value = a.partition("=")
            if key in ("size", "seed"):
                assert parsed[key] == int(value)
            elif key == "schedule":
                assert parsed[key] == value
