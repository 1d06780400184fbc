"""Batch arithmetic across ranks: micro batch x gradient accumulation x world size = global batch.

This is the one place where these numbers are combined. The trainer, the DeepSpeed JSON
(``pretrain/ds_config.py``) and the epoch bookkeeping all ask a ``BatchDims`` instead of
multiplying on their own, so they cannot disagree about what a step is.

Torch-free: ``cluster/`` uses it on machines without a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from hiceller.config import TrainConfig
from hiceller.errors import ConfigError

__all__ = ["BatchDims"]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class BatchDims:
    """How many cells one optimizer step consumes, and how they are split over ranks."""

    micro_batch: int
    """Cells per forward/backward pass on one rank."""
    grad_accum: int
    """Micro batches accumulated on each rank before the optimizer steps."""
    world_size: int
    """Data-parallel ranks (processes) taking part in every step."""

    def __post_init__(self) -> None:
        _positive_int("micro_batch", self.micro_batch)
        _positive_int("grad_accum", self.grad_accum)
        _positive_int("world_size", self.world_size)

    @property
    def global_batch(self) -> int:
        """Cells per optimizer step over all ranks."""
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def cells_per_rank_per_step(self) -> int:
        """Cells one rank reads for one optimizer step."""
        return self.micro_batch * self.grad_accum

    @classmethod
    def from_train(cls, train: TrainConfig, world_size: int) -> BatchDims:
        """The dims a run config asks for on ``world_size`` ranks."""
        return cls(train.micro_batch_cells, train.grad_accum, world_size)

    @classmethod
    def from_global(cls, global_batch: int, micro_batch: int, world_size: int) -> BatchDims:
        """Derive the accumulation steps that reach ``global_batch`` with this micro batch and world."""
        _positive_int("global_batch", global_batch)
        _positive_int("micro_batch", micro_batch)
        _positive_int("world_size", world_size)
        per_pass = micro_batch * world_size
        if global_batch % per_pass != 0:
            raise ConfigError(
                f"global batch {global_batch} is not divisible by micro batch {micro_batch} x world size "
                f"{world_size} = {per_pass}; choose a global batch that is a multiple of {per_pass}"
            )
        return cls(micro_batch, global_batch // per_pass, world_size)

    def steps_per_epoch(self, n_cells: int) -> int:
        """Full optimizer steps in one pass over ``n_cells`` cells (a last partial step is dropped).

        Dropping the remainder is what keeps every rank at the same number of batches, so that no
        rank waits in a collective for a batch another rank never gets.
        """
        if isinstance(n_cells, bool) or not isinstance(n_cells, int) or n_cells < 0:
            raise ConfigError(f"n_cells must be a non-negative integer, got {n_cells!r}")
        steps = n_cells // self.global_batch
        if steps == 0:
            raise ConfigError(
                f"{n_cells} cells do not fill one global batch of {self.global_batch} "
                f"(micro batch {self.micro_batch} x grad accum {self.grad_accum} x world size {self.world_size})"
            )
        return steps

    def describe(self) -> str:
        """One line for logs: ``micro 16 x accum 4 x world 8 = global 512``."""
        return (
            f"micro {self.micro_batch} x accum {self.grad_accum} x world {self.world_size} "
            f"= global {self.global_batch}"
        )
