"""Gold-standard training of Gaussian mixtures: settings (:mod:`.config`), batches and their
prefetching (:mod:`.batches`), densification (:mod:`.densify`), one half-set's trainer
(:mod:`.trainer`), the two-half run (:mod:`.loop`) and torch.distributed (:mod:`.distributed`)."""

from cryosplat.train.batches import BatchStream, batch_indices, check_batch_size, total_steps
from cryosplat.train.config import TrainConfig
from cryosplat.train.densify import DensifyStrategy
from cryosplat.train.distributed import (barrier, init_distributed, rank_and_world,
                                         resolve_device)
from cryosplat.train.loop import load_checkpoint, save_checkpoint, train_gold_standard
from cryosplat.train.trainer import HalfSetTrainer

__all__ = ["BatchStream", "DensifyStrategy", "HalfSetTrainer", "TrainConfig", "barrier",
           "batch_indices", "check_batch_size", "init_distributed", "load_checkpoint",
           "rank_and_world", "resolve_device", "save_checkpoint", "total_steps",
           "train_gold_standard"]
