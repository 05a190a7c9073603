"""The KL autoencoder that maps images to and from the latent space diffusion runs in."""

from ldm.autoencoder.autoencoder_kl import SD_LATENT_SCALE, AutoencoderKL
from ldm.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.autoencoder.modules import Decoder, Encoder

__all__ = ["SD_LATENT_SCALE", "AutoencoderKL", "DiagonalGaussianDistribution", "Decoder", "Encoder"]
