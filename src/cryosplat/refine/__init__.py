"""Local refinement of poses, origins and defoci through the Gaussian model
(``cryosplat refine``): the search (:mod:`.search`), the alternation with the models' fits
(:mod:`.loop`) and the run folder (:mod:`.run`)."""

from cryosplat.refine.loop import RefineConfig, refine_gold_standard
from cryosplat.refine.run import RefineRunConfig, load_refine_run, run_refinement
from cryosplat.refine.search import Pose, SearchConfig, refine_batch

__all__ = ["Pose", "RefineConfig", "RefineRunConfig", "SearchConfig", "load_refine_run",
           "refine_batch", "refine_gold_standard", "run_refinement"]
