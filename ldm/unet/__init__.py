"""The diffusion UNet (original Stable Diffusion module layout) and its blocks."""

from ldm.unet.blocks import Downsample, ResBlock, TimestepEmbedSequential, Upsample
from ldm.unet.unet import UNet

__all__ = ["Downsample", "ResBlock", "TimestepEmbedSequential", "UNet", "Upsample"]
