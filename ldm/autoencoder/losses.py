"""Losses of the autoencoder stage: reconstruction + KL, a PatchGAN discriminator with hinge loss and the
adaptive weight of Esser et al. (2021), and a perceptual (LPIPS-style) hook that needs local weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def patch_min_size(num_layers: int) -> int:
    """The smallest image side a ``PatchDiscriminator`` of ``num_layers`` takes: its stride-2 convolutions halve the
    input, then two of stride 1 take a pixel each, and at least one must be left."""
    return 3 * 2**num_layers


class PatchDiscriminator(nn.Module):
    """A PatchGAN: strided convs that score overlapping patches as real or fake (Isola et al., 2017)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        self.min_size = patch_min_size(num_layers)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above 1 and fake logits below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """Balance the generator's GAN term against reconstruction by their gradient norms at the decoder's last layer,
    capped at ``max_weight``. CompVis caps at 1e4 for a reconstruction loss summed over a sample's pixels; for one
    averaged over them (ldm's), pass 1e4 / (C x H x W) for the same balance."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class PerceptualLoss(nn.Module):
    """LPIPS-style distance: unit-normalised VGG16 features at five depths, weighted per channel and averaged.

    Weights come from local files only (nothing is downloaded): one state dict, or several merged, holding the VGG16
    ``features.*`` and the five channel weights [1, C, 1, 1]. The files as they are published read as they are:
    torchvision's ``vgg16-397923af.pth`` (its ``classifier.*`` is ignored) with LPIPS v0.1's ``vgg.pth``
    (``lin{i}.model.1.weight``), or one file in the layout ``save_random`` writes (``lin{i}.weight``).
    """

    CUTS = (4, 9, 16, 23, 30)  # after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, weights_path: str | Path | Sequence[str | Path] | None):
        super().__init__()
        paths = [weights_path] if weights_path is None or isinstance(weights_path, str | Path) else list(weights_path)
        absent = [p for p in paths if p is None or not Path(p).is_file()]
        if absent or not paths:
            raise FileNotFoundError(
                f"the perceptual loss needs local weights, and {absent[0] if absent else weights_path!r} is not a "
                "file. Set perceptual_weights to a file, or a list of files, holding VGG16 'features.*' and the "
                "LPIPS v0.1 channel weights (e.g. [vgg16-397923af.pth, vgg.pth]), or set perceptual_weight=0 to "
                "train without it."
            )
        from torchvision.models import vgg16

        self.features = vgg16(weights=None).features[: self.CUTS[-1]]
        for i, c in enumerate(self.CHANNELS):
            self.register_parameter(f"lin{i}", nn.Parameter(torch.ones(1, c, 1, 1)))
        state: dict[str, torch.Tensor] = {}
        for path in paths:
            for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
                if key.startswith("classifier."):  # torchvision's whole VGG16: its classifier is not used
                    continue
                if key.startswith("lin"):  # lin{i}.weight, or LPIPS' lin{i}.model.1.weight (a dropout before it)
                    key = key.split(".", 1)[0]
                state[key] = value
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"perceptual weights at {weights_path}: missing keys {missing[:5]}, unexpected "
                             f"{unexpected[:5]}")
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def save_random(cls, path: str | Path, seed: int = 0) -> None:
        """Write a randomly initialised weight file in the expected layout (for tests and smoke runs)."""
        from torchvision.models import vgg16

        torch.manual_seed(seed)
        state = {f"features.{k}": v for k, v in vgg16(weights=None).features[: cls.CUTS[-1]].state_dict().items()}
        for i, c in enumerate(cls.CHANNELS):
            state[f"lin{i}.weight"] = torch.rand(1, c, 1, 1)
        torch.save(state, path)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance [B] between images in [-1, 1]."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = 0.0
        start = 0
        for i, cut in enumerate(self.CUTS):
            h = self.features[start:cut](h)
            start = cut
            fx, fy = (h / (h.norm(dim=1, keepdim=True) + 1e-10)).chunk(2)
            total = total + ((fx - fy) ** 2 * getattr(self, f"lin{i}")).sum(1).mean(dim=(1, 2))
        return total
