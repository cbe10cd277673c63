"""Gaussian mixtures: the model (:mod:`.mixture`), its projection and the particle images it
makes through the CTF (:mod:`.render`), and its maps (:mod:`.voxelise`)."""

from cryosplat.gaussians.mixture import GaussianMixture, covariance_from_scales, softplus_inverse
from cryosplat.gaussians.render import (
                                        model_images,
                                        model_images_rfft,
                                        project_gaussians,
                                        render_rfft,
                                        splat_fourier,
                                        splat_patches,
)
from cryosplat.gaussians.voxelise import voxelise, voxelise_dense

__all__ = ["GaussianMixture", "covariance_from_scales", "model_images", "model_images_rfft",
           "project_gaussians", "render_rfft", "softplus_inverse", "splat_fourier",
           "splat_patches", "voxelise", "voxelise_dense"]
