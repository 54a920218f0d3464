"""One rank's share of a tensor-parallel model, and the collectives its layers meet in.

Megatron's split, by layer: the QKV and gate-up projections are split by output rows (column-parallel: each rank
computes its own heads, its own slice of the MLP's width), the output and down projections by input columns
(row-parallel: each rank's partial sum, then an all-reduce), the embedding and the LM head by vocabulary rows (the
embedding's lookup masked to the rank's rows and all-reduced; the logits all-gathered, so that every rank holds all
of them and draws the same tokens from the same seeds). Every rank samples, rather than rank 0 sampling and
broadcasting: each rank then has the step's tokens on its own device for the next step's inputs (async scheduling
feeds them there without a host round trip), and a step needs no second collective. Attention heads go to ranks in
whole KV-head groups: with at least as many KV heads as ranks each rank takes a run of KV heads (possibly uneven: 3
over 2 ranks is 2 + 1) with their query heads; with fewer, each KV head is copied on the ranks that share its query
heads.

`Shard.single()` is one rank of one: no collectives, nothing split.

On GPUs the collectives are NCCL's, and the decode CUDA graphs capture the layers' all-reduces with the rest of the
step (the logits' all-gather runs outside them); none of it has run on GPUs yet (that needs a two-GPU machine). A
one-shot all-reduce over peer memory, which can beat NCCL for a decode step's few kilobytes, is not built: whether
it pays is to be measured on two GPUs first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def split(n: int, world: int, rank: int) -> tuple[int, int]:
    """(start, size) of rank's contiguous part of n items over world ranks, the first n % world ranks one larger."""
    base, extra = divmod(n, world)
    return rank * base + min(rank, extra), base + (rank < extra)


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    group: Any = None  # the torch.distributed group for the layers' tensors (NCCL on GPUs, gloo on CPUs)
    control: Any = None  # a gloo group for host-side values (steps, page counts), on any device
    expert_parallel: bool = False  # MoE layers split their experts (whole ones per rank), not each expert's width

    @staticmethod
    def single() -> "Shard":
        return Shard(0, 1)

    def part(self, n: int) -> tuple[int, int]:
        return split(n, self.world, self.rank)

    def heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int, int, int]:
        """(first query head, query heads, first KV head, KV heads) of this rank."""
        group = num_heads // num_kv_heads
        if num_kv_heads >= self.world:
            kv0, kv_n = self.part(num_kv_heads)
            return kv0 * group, kv_n * group, kv0, kv_n
        if self.world % num_kv_heads or num_heads % self.world:
            raise ValueError(f"{num_heads} query / {num_kv_heads} KV heads cannot be split over {self.world} ranks: "
                             "with fewer KV heads than ranks the ranks must divide both evenly")
        q_n = num_heads // self.world
        q0 = self.rank * q_n
        return q0, q_n, q0 // group, 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of each rank's partial x (in place)."""
        if self.world > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Ranks' parts along the last dimension, joined in rank order into `total` columns (parts may be uneven:
        each travels padded to the largest)."""
        if self.world == 1:
            return x
        width = split(total, self.world, 0)[1]
        padded = x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[..., : split(total, self.world, r)[1]] for r, p in enumerate(parts)], -1)

    def min(self, value: int) -> int:
        """The smallest of the ranks' values (every rank gets it): what all can hold, e.g. KV pages."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.control)
        return int(t.item())
