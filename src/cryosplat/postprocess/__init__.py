"""Post-processing of two half-maps as RELION's relion_postprocess does it: the computation
(:mod:`.sharpen`) and the output folder (:mod:`.run`)."""

from cryosplat.postprocess.run import postprocess_files, postprocess_half_maps, write_postprocess
from cryosplat.postprocess.sharpen import Guinier, PostProcessed, postprocess

__all__ = ["Guinier", "PostProcessed", "postprocess", "postprocess_files", "postprocess_half_maps",
           "write_postprocess"]
