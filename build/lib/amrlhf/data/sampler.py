"""A seeded, resumable sampler: the permutation of epoch e depends only on (seed, e), and a
resumed run skips exactly the batches it had already trained on, in the epoch it had trained them
in only (a checkpoint at an epoch's last batch resumes at the start of the next epoch: nothing to skip).

Independent seeds get independent orders in every epoch: epoch 0 draws from `seed` itself (so one-epoch
runs keep the orders they always had), a later epoch from a 63-bit hash of (seed, epoch). The old rule,
`seed + epoch`, made seed s's epoch 1 replay seed s+1's epoch 0."""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import Sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of `epoch`'s permutation: `seed` for epoch 0, else sha256("seed:epoch") mod 2^63."""
    if epoch == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "big") >> 1


class ResumableSampler(Sampler[int]):
    def __init__(self, n: int, *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0  # samples (of this rank) to skip once, after a resume ...
        self.skip_epoch = 0  # ... if the first epoch iterated is this one

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples: int) -> None:
        """A checkpoint taken after `samples` samples of epoch `epoch`: skip them, if that epoch goes on."""
        self.epoch, self.skip, self.skip_epoch = epoch, samples, epoch

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.n // self.world_size  # equal shares: DDP ranks step together
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self):
        order = self._order()
        skip = self.skip if self.epoch == self.skip_epoch else 0
        self.skip = 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.n // self.world_size
