"""The Lightning data module (in-memory tensors or streamed folders) and the sampler that shards validation by rank."""

from __future__ import annotations

import lightning as L
import torch

from kdistill.config import Config
from kdistill.data import DataBundle, ImageTensors, make_loader
from kdistill.engine.resume import ResumableLoader


class TensorDataModule(L.LightningDataModule):
    """Train/val loaders (in-memory or streamed), sharded by rank once the trainer knows the world size."""

    def __init__(self, data: DataBundle, cfg: Config):
        super().__init__()
        self.data, self.cfg = data, cfg

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        t = self.trainer

        def progress() -> int:  # batches training consumed in this epoch (the loader runs ahead)
            return t.fit_loop.epoch_loop.batch_progress.current.processed

        if isinstance(self.data.train, ImageTensors):
            loader = make_loader(self.data.train, self.cfg.data.batch_size, True, self.cfg.seed,
                                 t.global_rank, t.world_size, self.cfg.data.num_workers, loader_class=ResumableLoader,
                                 samples_per_class=self.cfg.data.samples_per_class)
            loader.progress = progress
            return loader
        # a streamed loader records the batches training consumed (it runs ahead by its prefetch) to resume mid-epoch
        return make_loader(self.data.train, self.cfg.data.batch_size, True, self.cfg.seed,
                           t.global_rank, t.world_size, self.cfg.data.num_workers, progress=progress,
                           samples_per_class=self.cfg.data.samples_per_class)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        t = self.trainer
        if not isinstance(self.data.val, ImageTensors):  # streamed: rank's rows in order, unpadded, like EvalShard
            return make_loader(self.data.val, self.cfg.data.eval_batch_size, False, self.cfg.seed,
                               t.global_rank, t.world_size, self.cfg.data.num_workers)
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
