"""The evaluation callback's settings: off without reference statistics, and every missing or mismatched input a
ConfigError when it is built (before training), naming the config entry."""

from __future__ import annotations

import pytest
import torch

from ldm.errors import ConfigError
from ldm.eval.metrics import ENV_VARS, save_stats, weights_digest
from ldm.lightning.evaluation import Evaluation, check_evaluation
from ldm.lightning.settings import EVALUATION_TARGET


@pytest.fixture(autouse=True)
def _no_env_weights(monkeypatch):
    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def files(tmp_path):
    feats = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    save_stats(tmp_path / "ref.npz", feats, {"extractor": "inception-v3-compat"})
    save_stats(tmp_path / "clip.npz", feats, {"extractor": "clip-vit-b-32"})
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not loaded at construction")
    (tmp_path / "other.pth").write_bytes(b"another network")
    save_stats(tmp_path / "other_weights.npz", feats, {"extractor": "inception-v3-compat", "weights": "other.pth",
                                                        "weights_digest": weights_digest(tmp_path / "other.pth")})
    return tmp_path


def test_off_without_reference_statistics_checks_nothing():
    callback = Evaluation(weights_path="/nowhere.pth", captions=None)
    assert not callback.enabled
    callback.on_train_end(None, None)  # no-ops: nothing is generated
    check_evaluation("callbacks.ldm.evaluation", {"ref_stats": None}, text_conditioned=True)


def test_the_config_check_finds_the_callback_by_its_target():
    from hydra.utils import get_class

    assert get_class(EVALUATION_TARGET) is Evaluation


def test_enabled_resolves_weights_and_cycles_captions(files, monkeypatch):
    callback = Evaluation(str(files / "ref.npz"), weights_path=str(files / "weights.pth"), n=5, captions=["a", "b"])
    assert callback.enabled and callback.weights_path == str(files / "weights.pth")
    assert callback.captions_of(range(5)) == ["a", "b", "a", "b", "a"]
    monkeypatch.setenv("LDM_INCEPTION_WEIGHTS", str(files / "weights.pth"))
    from_env = Evaluation(str(files / "ref.npz"), captions_file=None)
    assert from_env.weights_path == str(files / "weights.pth") and from_env.captions_of([3]) == [""]
    (files / "captions.txt").write_text("one\n\n two \n")
    assert Evaluation(str(files / "ref.npz"), captions_file=str(files / "captions.txt")).captions == ["one", "two"]


@pytest.mark.parametrize("kwargs,message", [
    ({"weights_path": "MISSING"}, "does not exist"),
    ({"weights_path": None}, "LDM_INCEPTION_WEIGHTS"),
    ({"ref_stats": "nowhere.npz"}, "does not exist"),
    ({"ref_stats": "clip.npz"}, "clip-vit-b-32 features"),
    ({"n": 1}, "n must be an integer >= 2"),
    ({"every_n_steps": -1}, "every_n_steps"),
    ({"captions_file": "none.txt"}, "no such file"),
    ({"ref_stats": "other_weights.npz"}, r"features of the weights other.pth .* loads weights.pth"),
    ({"seed": 2**64 - 3, "n": 5}, r"seed must be at most 2\*\*64 - n"),
])
def test_bad_inputs_are_config_errors_naming_the_entry(files, kwargs, message):
    args = {"ref_stats": "ref.npz", "weights_path": "weights.pth", "captions": ["x"], **kwargs}
    paths = ("ref_stats", "weights_path", "captions_file")
    args = {k: str(files / v) if k in paths and v is not None else v for k, v in args.items()}
    with pytest.raises(ConfigError, match=message) as err:
        check_evaluation("callbacks.ldm.evaluation", args, text_conditioned=False)
    assert str(err.value).startswith("callbacks.ldm.evaluation: ")


def test_kid_needs_reference_features_and_text_models_need_captions(files):
    import numpy as np

    np.savez(files / "mu_sigma.npz", mu=np.zeros(8), sigma=np.eye(8))  # a pytorch-fid style file: no features
    weights = str(files / "weights.pth")
    Evaluation(str(files / "mu_sigma.npz"), weights_path=weights)  # FID alone is fine
    with pytest.raises(ConfigError, match="kid=true needs the reference features"):
        Evaluation(str(files / "mu_sigma.npz"), weights_path=weights, kid=True)
    with pytest.raises(ConfigError, match="captions"):
        check_evaluation("callbacks.ldm.evaluation", {"ref_stats": str(files / "ref.npz"), "weights_path": weights},
                         text_conditioned=True)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        check_evaluation("callbacks.ldm.evaluation", {"ref_stats": str(files / "ref.npz"), "typo": 1}, True)


CAPTIONS = ["a", "bb", "ccc"]


class _MeanColour:
    """A stand-in extractor: each image's mean colour as its features."""

    device = torch.device("cpu")

    def features(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        return images.float().mean((2, 3))


def _coded_images(pipe, captions, indices, seed, batch_size, **kwargs):
    """Image i coded in its pixels: (i, 2 i + seed, its caption's length)."""
    from PIL import Image

    return [Image.new("RGB", (4, 4), (i, 2 * i + seed, len(c))) for i, c in zip(indices, captions, strict=True)]


def _features_of_rank(rank: int, n: int) -> list:
    from contextlib import nullcontext
    from types import SimpleNamespace

    ev = Evaluation()  # off; _features needs only what is set here
    ev.n, ev.seed, ev.captions, ev._extractor = n, 3, CAPTIONS, _MeanColour()
    module = SimpleNamespace(device=torch.device("cpu"), sampling_pipeline=lambda: nullcontext(None),
                             guide_kwargs=lambda kwargs: kwargs)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return ev._features(SimpleNamespace(global_rank=rank, world_size=world), module).tolist()


@pytest.mark.parametrize("n", [5, 6])
def test_features_gathered_from_two_ranks_are_in_image_order(tmp_path, monkeypatch, n):
    """Rank r makes images r, r + 2, ...: the gathered features are every image's, in index order, the padding of
    an uneven split dropped, as one rank would give them."""
    import ldm.lightning.evaluation as evaluation
    from tests.two_ranks import on_two_ranks

    monkeypatch.setattr(evaluation, "generate_images", _coded_images)
    expected = [[float(i), 2.0 * i + 3, float(len(CAPTIONS[i % 3]))] for i in range(n)]
    assert _features_of_rank(0, n) == expected
    assert on_two_ranks(_features_of_rank, tmp_path / "store", n) == {0: expected, 1: expected}
