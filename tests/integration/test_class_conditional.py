"""A class-conditional model (unet.num_classes, labels from the shards) from training to sampling: the training grid,
sample.py's class_label, the evaluation set's balanced classes and the digit judge's labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.test_sample_cli import assert_regenerated, pixels, sample
from tests.integration.tiny_run import run_train


@pytest.fixture(scope="module")
def class_run(tmp_path_factory) -> Path:
    """A run of train.py on MNIST shards (their labels) with a 10-class UNet, a grid of two prompts given classes."""
    tmp = tmp_path_factory.mktemp("class_conditional")
    run_train(tmp, "dataset.source=mnist", "unet.num_classes=10", "vae_stage.max_steps=2", "ldm_stage.max_steps=3",
              "callbacks.ldm.samples.class_labels=[3,7]")
    return tmp / "run"


@pytest.fixture()
def recorded_labels(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The labels ``y`` of every UNet call from now on."""
    from ldm.unet import UNet

    calls: list[list[int]] = []
    forward = UNet.forward

    def recording(self, x, t, context=None, y=None, *args, **kwargs):
        calls.append(None if y is None else y.tolist())
        return forward(self, x, t, context, y, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", recording)
    return calls


def test_the_training_grid_samples_its_prompts_with_their_classes(class_run: Path) -> None:
    """The grid was skipped with a warning ("pass labels y") for a class-conditional UNet."""
    assert (class_run / "ldm" / "samples" / "samples_step000003.png").is_file()


def test_sample_py_takes_a_class_per_prompt_records_and_regenerates_it(class_run: Path, tmp_path: Path,
                                                                      recorded_labels) -> None:
    ckpt = class_run / "ldm" / "checkpoints" / "last.ckpt"
    kw = dict(steps=2, guidance_scale=3, seed=5)
    written = sample(ckpt, tmp_path / "two", prompt=["a handwritten digit three", "a handwritten digit three"],
                     class_label=[3, 7], batch_size=2, **kw)
    assert [json.loads(p.with_suffix(".json").read_text())["class_label"] for p in written] == [3, 7]
    assert all(y == [3, 7] for y in recorded_labels) and len(recorded_labels) == 2
    same = sample(ckpt, tmp_path / "same", prompt="a handwritten digit three", class_label=7, seed=6, steps=2,
                  guidance_scale=3)
    assert_regenerated(written[1], same[0])  # image 1 of the first run: seed 6, class 7
    assert not np.array_equal(pixels(written[0]), pixels(written[1]))  # the seed and the class differ
    recorded_labels.clear()
    again = sample(None, tmp_path / "again", regenerate=str(written[0].with_suffix(".json")))
    assert recorded_labels == [[3], [3]]
    assert_regenerated(written[0], again[0])
    for bad, match in [(dict(), r"is class-conditional \(10 classes\): give class_label=K"),
                       (dict(class_label=10), r"class_label 10 is not a class of .*\[0, 10\)"),
                       (dict(class_label=[1, 2]), "class_label holds 2 labels for 1 prompts")]:
        with pytest.raises(ValueError, match=match):
            sample(ckpt, tmp_path / "bad", prompt="a handwritten digit one", **kw, **bad)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_evaluation_sets_have_balanced_classes_and_the_digit_judge_its_digits(class_run: Path, tmp_path: Path,
                                                                             recorded_labels, monkeypatch) -> None:
    from ldm.eval import mnist
    from ldm.eval.generate import generate_images
    from ldm.eval.generate import main as generate_main
    from ldm.pipeline import LatentDiffusionPipeline

    ckpt = class_run / "ldm" / "checkpoints" / "last.ckpt"
    captions = tmp_path / "captions.txt"
    captions.write_text("a handwritten digit zero\n")
    args = [str(ckpt), "--captions", str(captions), "--n", "12", "--out", str(tmp_path / "set"), "--steps", "1",
            "--batch-size", "5", "--guidance", "1"]
    assert generate_main(args) == 0
    assert sum(recorded_labels, []) == [i % 10 for i in range(12)]  # image i: class i modulo 10
    pipe = LatentDiffusionPipeline.from_checkpoint(ckpt)
    recorded_labels.clear()
    generate_images(pipe, ["", ""], [4, 21], class_labels=[9, 8], num_inference_steps=1, guidance_scale=1)
    assert recorded_labels == [[9, 8]]
    recorded_labels.clear()
    digits = [9 - i % 10 for i in range(20)]  # another order than the default's: the judge passes its own
    monkeypatch.setattr(mnist, "balanced_labels", lambda n: digits[:n])
    torch.manual_seed(0)
    mnist.evaluate(pipe, mnist.DigitClassifier(), n=20, steps=1, batch=10)
    assert sum(recorded_labels, []) == digits  # one pass a step: the captions' digits
