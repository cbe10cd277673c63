"""Gold-standard fitting of Gaussian mixtures: settings (:mod:`.config`), batches and their
prefetching (:mod:`.batches`), densification (:mod:`.densify`), one half-set's trainer
(:mod:`.trainer`), the images objective's run (:mod:`.loop`), the volume objective
(:mod:`.volume`), the one driver of two half-sets (:mod:`.halves`), checkpoints
(:mod:`.checkpoint`) and torch.distributed (:mod:`.distributed`)."""

from cryosplat.train.batches import BatchStream, batch_indices, check_batch_size, total_steps
from cryosplat.train.checkpoint import load_checkpoint, save_checkpoint
from cryosplat.train.config import TrainConfig
from cryosplat.train.densify import DensifyStrategy
from cryosplat.train.distributed import barrier, init_distributed, rank_and_world, resolve_device
from cryosplat.train.halves import HalfSetFit, Record, step_halves
from cryosplat.train.loop import ImagesRun, train_gold_standard
from cryosplat.train.trainer import HalfSetTrainer

__all__ = ["BatchStream", "DensifyStrategy", "HalfSetFit", "HalfSetTrainer", "ImagesRun",
           "Record", "TrainConfig", "barrier", "batch_indices", "check_batch_size",
           "init_distributed", "load_checkpoint", "rank_and_world", "resolve_device",
           "save_checkpoint", "step_halves", "total_steps", "train_gold_standard"]
