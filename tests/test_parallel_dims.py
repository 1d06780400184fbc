"""BatchDims: the one place where micro batch x accumulation x world size = global batch."""

from __future__ import annotations

import itertools

import pytest

from hiceller.config import TrainConfig, load_config
from hiceller.errors import ConfigError
from hiceller.parallel_dims import BatchDims


def test_products():
    d = BatchDims(micro_batch=16, grad_accum=4, world_size=8)
    assert d.global_batch == 512
    assert d.cells_per_rank_per_step == 64
    assert d.describe() == "micro 16 x accum 4 x world 8 = global 512"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(micro_batch=0, grad_accum=1, world_size=1), "micro_batch"),
        (dict(micro_batch=1, grad_accum=-2, world_size=1), "grad_accum"),
        (dict(micro_batch=1, grad_accum=1, world_size=0), "world_size"),
        (dict(micro_batch=1.5, grad_accum=1, world_size=1), "micro_batch"),
        (dict(micro_batch=True, grad_accum=1, world_size=1), "micro_batch"),
    ],
)
def test_rejects_bad_dims(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        BatchDims(**kwargs)


def test_from_global_derives_accumulation():
    d = BatchDims.from_global(global_batch=1024, micro_batch=32, world_size=8)
    assert d == BatchDims(32, 4, 8)


@pytest.mark.parametrize("global_batch, micro, world", [(1000, 32, 8), (128, 32, 8), (100, 3, 1)])
def test_from_global_not_divisible(global_batch, micro, world):
    with pytest.raises(ConfigError, match=f"not divisible by micro batch {micro} x world size {world}"):
        BatchDims.from_global(global_batch, micro, world)


def test_from_global_round_trips():
    for micro, accum, world in itertools.product([1, 3, 16], [1, 2, 5], [1, 4, 6]):
        d = BatchDims(micro, accum, world)
        assert BatchDims.from_global(d.global_batch, micro, world) == d


def test_from_train_uses_config_fields():
    cfg = load_config("base")
    d = BatchDims.from_train(cfg.train, 32)
    assert (d.micro_batch, d.grad_accum, d.world_size) == (32, 4, 32)
    assert d.global_batch == 4096
    assert BatchDims.from_train(TrainConfig(micro_batch_cells=5, grad_accum=3), 2).global_batch == 30


def test_steps_per_epoch_drops_partial_step():
    d = BatchDims(micro_batch=4, grad_accum=2, world_size=3)  # 24 cells per step
    assert d.steps_per_epoch(24) == 1
    assert d.steps_per_epoch(47) == 1
    assert d.steps_per_epoch(48) == 2
    assert d.steps_per_epoch(10_000) == 416


def test_steps_per_epoch_errors():
    d = BatchDims(4, 2, 3)
    with pytest.raises(ConfigError, match="23 cells do not fill one global batch of 24"):
        d.steps_per_epoch(23)
    with pytest.raises(ConfigError, match="non-negative integer"):
        d.steps_per_epoch(-1)


def test_frozen():
    d = BatchDims(1, 1, 1)
    with pytest.raises(AttributeError):
        d.world_size = 2  # type: ignore[misc]
