"""The Lightning data module of in-memory data sets and the sampler that shards validation by rank."""

from __future__ import annotations

import lightning as L
import torch

from kdistill.config import Config
from kdistill.data import DataBundle, make_loader
from kdistill.engine.resume import ResumableLoader


class TensorDataModule(L.LightningDataModule):
    """In-memory train/val loaders, sharded by rank once the trainer knows the world size."""

    def __init__(self, data: DataBundle, cfg: Config):
        super().__init__()
        self.data, self.cfg = data, cfg

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        t = self.trainer
        loader = make_loader(self.data.train, self.cfg.data.batch_size, True, self.cfg.seed,
                             t.global_rank, t.world_size, self.cfg.data.num_workers, loader_class=ResumableLoader)
        loader.progress = lambda: t.fit_loop.epoch_loop.batch_progress.current.processed
        return loader

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        t = self.trainer
        sampler = EvalShard(len(self.data.val), self.cfg.data.eval_batch_size, t.global_rank, t.world_size)
        return torch.utils.data.DataLoader(self.data.val, batch_size=None, sampler=sampler,
                                           num_workers=self.cfg.data.num_workers, generator=torch.Generator())


class EvalShard(torch.utils.data.Sampler[list[int]]):
    """Rank ``rank``'s share of the validation rows, in order, without padding: every sample is
    counted exactly once over all ranks, so the reduced accuracy is the accuracy on the whole split."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.rows = list(range(rank, size, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.rows), self.batch_size):
            yield self.rows[start : start + self.batch_size]
