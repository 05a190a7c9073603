"""ldm: a from-scratch latent diffusion framework."""
