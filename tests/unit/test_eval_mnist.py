"""The digit classifier and the MNIST judge: the classifier learns, saves and loads; FID-MNIST is the Fréchet
distance; the judge rewards right digits, punishes wrong ones and sees a collapsed generator; the preset composes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from hydra import compose, initialize_config_dir

from ldm.data.builtin.mnist import DIGIT_NAMES, MNISTDataset
from ldm.errors import ConfigError
from ldm.eval import mnist as judge
from ldm.eval import train_classifier as train_cli
from ldm.eval.digits import DigitClassifier, classify, load_classifier, save_classifier, train_classifier

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[DigitClassifier, dict, Path]:
    """A classifier trained for 2 epochs on 2,000 digits (a few seconds), saved once for the module."""
    torch.set_num_threads(1)
    data = MNISTDataset()
    pick = np.random.default_rng(0).permutation(len(data))[:2500]
    model, meta = train_classifier(data.images[pick], data.labels[pick], holdout=500, epochs=2, seed=0)
    path = tmp_path_factory.mktemp("clf") / "mnist.pt"
    save_classifier(path, model, meta)
    return model, meta, path


def test_classifier_learns_and_round_trips(classifier) -> None:
    model, meta, path = classifier
    assert meta["holdout"] == 500 and meta["train"] == 2000
    assert meta["holdout_accuracy"] > 0.8  # chance is 0.1
    loaded = load_classifier(path)
    x = torch.from_numpy(MNISTDataset().images[:64])
    with torch.no_grad():
        a, b = model.eval()(DigitClassifier.prepare(x)), loaded(DigitClassifier.prepare(x))
    torch.testing.assert_close(a, b)
    pred, feats = classify(loaded, x)
    assert pred.shape == (64,) and feats.shape == (64, 128) and feats.dtype == torch.float64


def test_prepare_accepts_rgb_and_other_sizes() -> None:
    gray = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    rgb = gray[:, None].expand(2, 3, 28, 28)
    torch.testing.assert_close(DigitClassifier.prepare(rgb), DigitClassifier.prepare(gray))
    assert DigitClassifier.prepare(torch.zeros(3, 3, 32, 32, dtype=torch.uint8)).shape == (3, 1, 28, 28)


def test_missing_or_foreign_classifier_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="python -m ldm.eval.train_classifier mnist --out"):
        load_classifier(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a digit classifier"):
        load_classifier(tmp_path / "other.pt")


def test_frechet_distance_is_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64)
    b = torch.randn(200, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    want = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))
    assert judge.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert judge.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_judge_scores_real_digits_wrong_labels_and_collapse(classifier) -> None:
    model, meta, _ = classifier
    data = MNISTDataset()
    ref = judge.real_reference(model)
    idx = np.concatenate([np.flatnonzero(data.labels == c)[:30] for c in range(10)])
    images, labels = torch.from_numpy(data.images[idx]), torch.from_numpy(data.labels[idx])
    real = judge.judge_images(images, labels, model, reference=ref)
    assert real["n"] == 300 and real["accuracy"] > 0.8
    assert set(real["accuracy_per_class"]) == set(DIGIT_NAMES)
    assert 0.8 < real["pixel_std_ratio"] < 1.2
    assert real["fid_mnist"] < 3 * real["fid_mnist_real_floor"] + 1

    # the floor: n real digits against the others, never against themselves (it was 0 at n = 5,000)
    feats = ref["features"]
    order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))
    assert real["fid_mnist_real_floor"] == pytest.approx(judge.frechet_distance(feats[order[:300]],
                                                                                 feats[order[300:]]))
    every = judge.judge_images(torch.from_numpy(data.images), torch.from_numpy(data.labels), model, reference=ref)
    assert every["n"] == len(feats) and every["fid_mnist_real_floor"] is None

    wrong = judge.judge_images(images, (labels + 1) % 10, model, reference=ref)
    assert wrong["accuracy"] < 0.2 and wrong["fid_mnist"] == pytest.approx(real["fid_mnist"])

    # one image per class, repeated: right digits, no diversity, far from the real distribution
    first = torch.stack([images[labels == c][0] for c in range(10)])
    collapsed = judge.judge_images(first.repeat(30, 1, 1), torch.arange(10).repeat(30), model, reference=ref)
    assert collapsed["pixel_std_ratio"] < 0.05
    assert collapsed["fid_mnist"] > 2 * real["fid_mnist"]


class _DigitPipe:
    """Stands in for the pipeline: returns a real digit of the prompted class, as images in [-1, 1] at 32 px."""

    class sampling:  # noqa: N801 - mimics the pipeline's attribute
        guidance_scale = 3.0

    num_classes = None  # a text-conditioned model

    def __init__(self) -> None:
        self.data = MNISTDataset()
        self.calls: list[dict] = []

    def __call__(self, captions, generator=None, output_type=None, **kwargs):
        self.calls.append({"n": len(captions), **kwargs})
        out = []
        for c in captions:
            label = DIGIT_NAMES.index(c.rsplit(" ", 1)[1])
            pool = np.flatnonzero(self.data.labels == label)
            i = int(torch.randint(len(pool), (1,), generator=generator))
            x = torch.from_numpy(self.data.images[pool[i]]).float()[None, None] / 127.5 - 1
            out.append(torch.nn.functional.interpolate(x, size=32, mode="bilinear").expand(1, 3, 32, 32))
        return torch.cat(out)


def test_evaluate_prompts_every_class_and_reads_them_back(classifier) -> None:
    model, _, _ = classifier
    pipe = _DigitPipe()
    results = judge.evaluate(pipe, model, n=40, guidance_scales=(None, 2.0), steps=5, batch=16)
    assert set(results) == {"guidance_3", "guidance_2"}
    r = results["guidance_3"]
    assert r["n"] == 40 and r["accuracy"] > 0.8 and set(r["accuracy_per_class"]) == set(DIGIT_NAMES)
    assert [c["n"] for c in pipe.calls[:3]] == [16, 16, 8] and pipe.calls[0]["num_inference_steps"] == 5
    assert pipe.calls[3]["guidance_scale"] == 2.0
    with pytest.raises(ConfigError, match="n >= 20"):
        judge.evaluate(pipe, model, n=10)


def test_cli_errors_exit_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        judge.main([str(tmp_path / "x.ckpt"), "--classifier", str(tmp_path / "none.pt")])
    assert err.value.code == 2 and "train_classifier" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # --json's folder is checked before the models load
        judge.main([str(tmp_path / "x.ckpt"), "--json", str(tmp_path / "none" / "figures.json")])
    assert err.value.code == 2 and "the folder" in capsys.readouterr().err
    assert train_cli.main(["cifar10", "--out", str(tmp_path / "c.pt")]) == 2
    assert "choose one of ['mnist']" in capsys.readouterr().err


def test_mnist_quickstart_preset_is_the_quickstart_on_digits(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        digits = compose("train", overrides=["experiment=mnist_quickstart", f"out_dir={tmp_path}"])
        shapes = compose("train", overrides=["experiment=quickstart", f"out_dir={tmp_path}"])
    assert digits.dataset.source == "mnist" and digits.data.train_shards == "data/mnist"
    assert digits.dataset.length is None and digits.data.hflip is False
    assert digits.ldm_stage == shapes.ldm_stage and digits.unet == shapes.unet
    assert digits.sampling.guidance_scale == 2.0
    assert digits.sampling.guidance_interval == shapes.sampling.guidance_interval
    assert [p.rsplit(" ", 1)[1] for p in digits.callbacks.ldm.samples.prompts] == list(DIGIT_NAMES)


@pytest.mark.parametrize("holdout", [0, -5, 30, 1.5])
def test_a_holdout_leaving_nothing_to_train_or_measure_is_refused(holdout):
    from ldm.eval.digits import train_classifier

    images, labels = np.zeros((30, 28, 28), np.uint8), np.arange(30) % 10
    with pytest.raises(ConfigError, match=r"holdout must be an integer in \[1, 29\]"):
        train_classifier(images, labels, holdout=holdout, epochs=1)

