"""Post-processing of two half-maps as RELION's relion_postprocess does it: the computation
(:mod:`.sharpen`, re-exported here) and the output folder (:mod:`.run`, imported from there:
it draws with :mod:`cryosplat.report`, which itself imports :mod:`.sharpen`)."""

from cryosplat.postprocess.sharpen import Guinier, PostProcessed, postprocess

__all__ = ["Guinier", "PostProcessed", "postprocess"]
