"""cryosplat: cryo-EM reconstruction with a physics-exact Gaussian-splatting renderer."""

__version__ = "0.1.0"
