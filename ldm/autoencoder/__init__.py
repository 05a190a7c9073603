"""The KL autoencoder that maps images to and from the latent space diffusion runs in."""

from ldm.autoencoder.autoencoder_kl import AutoencoderKL
from ldm.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.autoencoder.modules import Decoder, Encoder

__all__ = ["AutoencoderKL", "DiagonalGaussianDistribution", "Decoder", "Encoder"]
