"""Neural-network building blocks shared by the UNet, the VAE and the text encoders."""
