"""Which examples each rank reads at each step: independent of how many ranks there are.

The global batch of step t is examples ``order[t·G … (t+1)·G − 1]`` (wrapping into the next epoch),
G = micro_batch_size × world × grad_accum_steps, where ``order`` is the file order or a seeded
permutation per epoch. Rank r takes the r-th contiguous block of micro_batch_size × grad_accum_steps
of them and splits it into micro-batches. Together with the global-token-mean loss this makes the
step's gradient the same for any world size and accumulation with the same G.
"""

from __future__ import annotations

import torch


class GlobalBatches:
    def __init__(self, num_examples: int, global_batch: int, shuffle: bool, seed: int) -> None:
        if num_examples < 1:
            raise ValueError("no training examples")
        self.num_examples, self.global_batch, self.shuffle, self.seed = num_examples, global_batch, shuffle, seed
        self._epoch, self._order = -1, None

    def _order_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.num_examples, generator=g)
            else:
                self._order = torch.arange(self.num_examples)
            self._epoch = epoch
        return self._order

    def step_indices(self, step: int) -> list[int]:
        """Example indices of the global batch of ``step``."""
        out = []
        for pos in range(step * self.global_batch, (step + 1) * self.global_batch):
            out.append(int(self._order_of(pos // self.num_examples)[pos % self.num_examples]))
        return out

    def rank_micro_batches(self, step: int, rank: int, world: int, accum: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) of ``step``."""
        indices = self.step_indices(step)
        per_rank = self.global_batch // world
        mine = indices[rank * per_rank:(rank + 1) * per_rank]
        micro = per_rank // accum
        return [mine[i * micro:(i + 1) * micro] for i in range(accum)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_examples
