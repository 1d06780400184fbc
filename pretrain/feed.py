"""Micro batches for the training loop, prepared on the device; on CUDA one batch ahead of compute.

The loop asks for micro batch ``(step, micro)`` in order. Without lookahead (CPU) the feed reads and
prepares it there and then, exactly as a plain loop would. With lookahead (CUDA), after handing out
one batch it already reads and prepares the next: the task's ``prepare`` runs on the host, its
tensors go to page-locked memory and are copied on a side CUDA stream, so batch i+1's
host-to-device copy (and its host-side tokenising and packing) overlaps batch i's compute.

Lookahead never reads past the end of a step that is followed by a checkpoint: a checkpoint's loader
state must cover exactly the batches that were trained on, or a resumed run would skip one.
Preparing ahead changes no random draw: ``prepare`` seeds its own generator from (seed, step, micro,
shard), and global RNG state (dropout) is not touched by it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from hiceller.config import RunConfig
from pretrain.task import micro_seed

__all__ = ["MicroBatchFeed"]

Key = tuple[int, int]


class MicroBatchFeed:
    """``get(step, micro) -> (batch, prepared args)`` over this rank's data shards.

    Args:
        task: the loop's task (its ``prepare(batch, seed, device)`` returns a tuple of tensors/values).
        streams: this rank's data shards (objects with ``dataloader()``, ``set_epoch()``, ``epoch``, ``rank``).
        cfg: the run config (grad accumulation, seed, loader workers).
        device: where the prepared tensors go.
        lookahead: prepare the next micro batch while the current one computes (see the module docstring).
    """

    def __init__(self, task: nn.Module, streams: list, cfg: RunConfig, device: torch.device, lookahead: bool) -> None:
        self.task = task
        self.streams = streams
        self.cfg = cfg
        self.device = torch.device(device)
        self.lookahead = lookahead
        self.grad_accum = cfg.train.grad_accum
        self.iters = [iter(s.dataloader(num_workers=cfg.data.num_workers)) for s in streams]
        self.copy_stream = torch.cuda.Stream(self.device) if lookahead and self.device.type == "cuda" else None
        self._ahead: tuple[Key, Any, tuple] | None = None

    def _next_batch(self, k: int):
        """Next batch of shard k; at the end of an epoch start the next one (same epoch on every rank)."""
        try:
            return next(self.iters[k])
        except StopIteration:
            s = self.streams[k]
            s.set_epoch(s.epoch + 1)
            self.iters[k] = iter(s.dataloader(num_workers=self.cfg.data.num_workers))
            return next(self.iters[k])

    def _prepare(self, key: Key) -> tuple[Any, tuple]:
        step, micro = key
        shards = len(self.streams)
        k = micro % shards
        batch = self._next_batch(k)
        # Seeded by the shard's own micro index, so a shard draws the same masks whichever
        # rank reads it (1 rank x 2 shards == 2 ranks x 1 shard).
        seed = micro_seed(self.cfg.train.seed, step, micro // shards, self.streams[k].rank)
        # The shard's own micro-batch count, likewise the same whichever rank reads the shard.
        index = step * (self.grad_accum // shards) + micro // shards
        if self.copy_stream is None:
            return batch, self.task.prepare(batch, seed, self.device, index)
        host = self.task.prepare(batch, seed, torch.device("cpu"), index)
        with torch.cuda.stream(self.copy_stream):
            return batch, tuple(_map_tensors(host, lambda t: t.pin_memory().to(self.device, non_blocking=True)))

    def _next_key(self, key: Key) -> Key:
        step, micro = key
        return (step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0)

    def get(self, step: int, micro: int, prefetch: bool = True) -> tuple[Any, tuple]:
        """Micro batch ``(step, micro)``: the batch as read and the task's prepared arguments.

        ``prefetch``: with lookahead, whether the next micro batch may be read now; the loop passes
        False for the last micro batch of a step that ends with a checkpoint or the run.
        """
        key = (step, micro)
        if self._ahead is not None and self._ahead[0] == key:
            _, batch, args = self._ahead
            self._ahead = None
        else:
            if self._ahead is not None:  # only a caller that skipped a key gets here
                raise RuntimeError(f"micro batch {self._ahead[0]} was read ahead but {key} was asked for")
            batch, args = self._prepare(key)
        if self.copy_stream is not None:
            # Compute waits for the copy; the copied tensors' memory must not be reused by the copy
            # stream's allocator while compute still reads it.
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.copy_stream)
            _map_tensors(args, lambda t: t.record_stream(current))
        if self.lookahead and prefetch:
            nxt = self._next_key(key)
            self._ahead = (nxt, *self._prepare(nxt))
        return batch, args

    def close(self) -> None:
        """Drop the loader iterators (stops their worker processes)."""
        for it in self.iters:
            close = getattr(it, "close", None)
            if close:
                close()
        self._ahead = None


def _map_tensors(values: tuple, fn: Callable[[torch.Tensor], Any]) -> list:
    """``fn`` on every tensor of the prepared arguments, and inside those that hold tensors
    (``map_tensors``: the generative split's index arrays)."""
    return [fn(v) if torch.is_tensor(v) else v.map_tensors(fn) if hasattr(v, "map_tensors") else v for v in values]
