"""The process layout of a run: data parallel x sequence parallel, and each rank's place in it.

Every part of the trainer that depends on the layout asks this one object: the batching (which share of the global
batch a rank trains, and which piece of each row), the DeepSpeed batch sizes, the logs. The ranks of one sequence-
parallel group are consecutive, as DeepSpeed's Ulysses groups them
(deepspeed.runtime.sequence_parallel.parallel_state_sp): with 8 processes and a sequence-parallel size of 2, ranks
0-1 share one data-parallel slot, 2-3 the next, and so on.

    world 8, sequence_parallel 2:   rank  0 1 | 2 3 | 4 5 | 6 7
                                    dp    0 0 | 1 1 | 2 2 | 3 3
                                    sp    0 1 | 0 1 | 0 1 | 0 1
"""

from __future__ import annotations

from dataclasses import dataclass


class ParallelLayoutError(ValueError):
    """The processes cannot be arranged as asked; the message names the flag and the fix."""


@dataclass(frozen=True)
class ParallelDims:
    world_size: int  # every process of the run
    sequence_parallel: int = 1  # --sequence_parallel_size: processes that share each row
    rank: int = 0  # this process's global rank

    def __post_init__(self) -> None:
        if self.sequence_parallel < 1:
            raise ParallelLayoutError(f"--sequence_parallel_size must be at least 1, got {self.sequence_parallel}.")
        if self.world_size % self.sequence_parallel:
            raise ParallelLayoutError(
                f"--sequence_parallel_size {self.sequence_parallel} does not divide the {self.world_size} processes: "
                "launch a multiple of it (processes = data-parallel degree x sequence-parallel size).")

    @property
    def data_parallel(self) -> int:
        """Replicas that train different examples: processes / sequence-parallel size."""
        return self.world_size // self.sequence_parallel

    @property
    def dp_rank(self) -> int:
        """Which share of the global batch this rank trains (shared with its sequence-parallel group)."""
        return self.rank // self.sequence_parallel

    @property
    def sp_rank(self) -> int:
        """Which piece of each row this rank holds within its sequence-parallel group."""
        return self.rank % self.sequence_parallel

    @property
    def sp_enabled(self) -> bool:
        return self.sequence_parallel > 1

    def sp_group_ranks(self) -> list[int]:
        start = self.dp_rank * self.sequence_parallel
        return list(range(start, start + self.sequence_parallel))

    def __str__(self) -> str:
        if not self.sp_enabled:
            return f"{self.world_size} data-parallel process{'es' if self.world_size != 1 else ''}"
        return (f"{self.world_size} processes = {self.data_parallel} data-parallel x {self.sequence_parallel} "
                "sequence-parallel")
