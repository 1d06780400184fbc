"""Token-budget micro batches: budget kept, equal batch counts on 1..4 ranks, each cell at most once, exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from data_store.stream import CellStream, stream_from_config
from data_store.token_budget import cell_token_lengths, greedy_cuts
from data_store.tokenize import Tokenizer
from hiceller.config import load_config
from hiceller.errors import ConfigError, HicellerError, InputError
from test_stream import N_GENES, build_store, cell_genes

MAX_GENES = 12
"""Cells have 5..15 genes (test_stream.cell_genes): some are cut to 12, so lengths are 6..13 tokens."""
BUDGET = 60


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    return build_store(tmp_path_factory.mktemp("budget") / "store")


def make(store_uri: str, **kw) -> CellStream:
    args = dict(batch_tokens=BUDGET, tokenizer=Tokenizer(max_genes=MAX_GENES, seed=0), seed=3, block_size=16, buffer_blocks=4)
    args.update(kw)
    return CellStream(store_uri, **args)


def joinids_of(batches) -> list[int]:
    return [int(j) for b in batches for j in b.joinids]


def test_greedy_cuts_fill_each_batch_up_to_the_budget():
    lengths = np.random.default_rng(0).integers(1, 40, size=2000).astype(np.int32)
    lengths[[7, 500]] = 90  # longer than the budget: alone in its batch
    ends = greedy_cuts(lengths, 64)
    starts = np.concatenate([[0], ends[:-1]])
    assert ends[-1] == len(lengths) and np.all(ends > starts)
    sums = np.add.reduceat(lengths, starts)
    alone = (ends - starts == 1)
    assert np.all((sums <= 64) | alone)
    # greedy: the next cell would not have fitted
    assert np.all(sums[:-1] + lengths[ends[:-1]] > 64)


def test_lengths_are_the_tokens_the_cells_become(store_uri):
    s = make(store_uri, shuffle=False, seed=None, rank=0, world_size=1)
    lengths = s.cell_lengths()
    expect = np.array([min(len(cell_genes(j)), MAX_GENES) + 1 for j in s.joinids])
    np.testing.assert_array_equal(lengths, expect)
    seen = {int(j): int(n) for b in s for j, n in zip(b.joinids, b.seqlens)}
    assert seen == {int(j): int(n) for j, n in zip(s.joinids, expect)}
    # a gene map that drops genes shortens cells as the tokenizer sees them
    gene_map = np.where(np.arange(N_GENES) % 2 == 0, np.arange(N_GENES), -1)
    mapped = cell_token_lengths(store_uri, s.joinids, MAX_GENES, gene_map)
    expect_mapped = [min(int((cell_genes(j) % 2 == 0).sum()), MAX_GENES) + 1 for j in s.joinids]
    np.testing.assert_array_equal(mapped, expect_mapped)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_equal_batches_on_every_rank_within_budget_each_cell_at_most_once(store_uri, world):
    seen: list[int] = []
    counts = []
    for rank in range(world):
        s = make(store_uri, rank=rank, world_size=world)
        batches = list(s)
        counts.append((len(s), len(batches)))
        assert all(b.n_tokens <= BUDGET for b in batches)
        # no batch is closed early except at the end of a shuffle window (a few per rank)
        assert sum(b.n_tokens <= BUDGET - 13 for b in batches) <= len(s.layout_for().windows())
        seen += joinids_of(batches)
    assert len({c for c in counts}) == 1, counts  # the same count, as promised and as yielded
    n = make(store_uri, rank=0, world_size=1).n_cells
    assert len(seen) == len(set(seen))
    if world == 1:
        assert sorted(seen) == list(range(n))
    else:  # the ranks' surplus batches sit the epoch out: a few cells, not a rank's share
        assert len(seen) >= n - world * (2 * BUDGET // 6)


def test_batches_change_with_the_epoch(store_uri):
    s = make(store_uri, rank=0, world_size=2)
    first = joinids_of(s)
    s.set_epoch(1)
    assert joinids_of(s) != first


@pytest.mark.parametrize("consumed", [0, 7, 29])
def test_resume_yields_exactly_the_remaining_batches(store_uri, consumed):
    ref = make(store_uri, rank=1, world_size=2)
    ref.set_epoch(1)
    expected = list(ref)
    s = make(store_uri, rank=1, world_size=2)
    s.set_epoch(1)
    it = iter(s)
    for _ in range(consumed):
        next(it)
    state = s.state_dict()
    again = make(store_uri, rank=1, world_size=2)
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(expected) - consumed
    for a, b in zip(rest, expected[consumed:]):
        assert a.joinids.tolist() == b.joinids.tolist()
        assert a.gene_ids.tolist() == b.gene_ids.tolist() and a.values.tolist() == b.values.tolist()


@pytest.mark.slow
def test_resume_with_loader_workers(store_uri):
    """Two spawned workers (~20 s per loader on CI): the resumed loader continues as the first went on."""
    loader = make(store_uri, rank=0, world_size=1, buffer_blocks=2).dataloader(num_workers=2)
    it = iter(loader)
    for _ in range(11):
        next(it)
    state = loader.state_dict()
    rest = list(it)
    assert len(rest) == len(loader) - 11
    again = make(store_uri, rank=0, world_size=1, buffer_blocks=2).dataloader(num_workers=2)
    again.load_state_dict(state)
    assert joinids_of(again) == joinids_of(rest)


def test_resume_refuses_another_budget_or_cell_batches(store_uri):
    state = make(store_uri, rank=0, world_size=1).state_dict()
    with pytest.raises(HicellerError, match="token budget"):
        make(store_uri, rank=0, world_size=1, batch_tokens=BUDGET + 1).load_state_dict(state)
    with pytest.raises(HicellerError, match="batch size"):
        make(store_uri, rank=0, world_size=1, batch_tokens=None, batch_cells=8).load_state_dict(state)


@pytest.mark.parametrize(("old", "new", "taken"), [(2, 1, 3), (1, 2, 5), (2, 3, 2)])
def test_token_budget_epoch_continues_on_another_world(store_uri, old, new, taken):
    """An epoch saved on ``old`` ranks after ``taken`` batches each goes on on ``new`` ranks with the
    cells no saved batch had: none twice, equal batch counts on the new ranks, each within budget,
    and the only cells left out are the new world's own surplus (as in any token-budget epoch)."""
    seen, saved = [], []
    for r in range(old):
        s = make(store_uri, rank=r, world_size=old)
        s.set_epoch(1)
        it = iter(s)
        seen += [j for _ in range(taken) for j in next(it).joinids.tolist()]
        saved.append(s.state_dict())
    streams = [make(store_uri, rank=r, world_size=new) for r in range(new)]
    for s in streams:
        s.set_epoch(1)
        s.load_epoch_state(saved)
    assert len({len(s) for s in streams}) == 1
    for s in streams:
        batches = list(s)
        assert len(batches) == len(s) and all(b.n_tokens <= BUDGET for b in batches)
        seen += joinids_of(batches)
    assert len(seen) == len(set(seen))
    all_cells = set(streams[0].joinids.tolist())
    left_out = all_cells - set(seen)
    # the new world's surplus: cells left for it that no rank's kept batches hold
    rest = set(streams[0].joinids[streams[0]._token_rest].tolist())
    assert left_out <= rest and len(left_out) < 0.1 * len(all_cells)
    # the same world is the plain resume
    same = make(store_uri, rank=0, world_size=old)
    same.set_epoch(1)
    same.load_epoch_state(saved)
    assert same._start_batch == taken and same._token_rest is None


def test_token_budget_epoch_moved_twice_sees_no_cell_twice(store_uri):
    """2 ranks, then 3, then 1 within one epoch: the second move replays the first from the saved history."""
    def stage(streams, n):
        cells = []
        for s in streams:
            it = iter(s)
            cells += [j for _ in range(n) for j in next(it).joinids.tolist()]
        return cells, [s.state_dict() for s in streams]

    first = [make(store_uri, rank=r, world_size=2) for r in range(2)]
    seen, saved = stage(first, 2)
    second = [make(store_uri, rank=r, world_size=3) for r in range(3)]
    for s in second:
        s.load_epoch_state(saved)
    more, saved = stage(second, 2)
    last = make(store_uri, rank=0, world_size=1)
    last.load_epoch_state(saved)
    seen += more + joinids_of(list(last))
    assert len(seen) == len(set(seen))
    assert len(set(last.joinids.tolist()) - set(seen)) < 0.1 * last.n_cells


def test_bad_stream_arguments(store_uri):
    with pytest.raises(InputError, match="max_genes \\+ 1 = 13"):
        make(store_uri, batch_tokens=12)
    with pytest.raises(InputError, match="one of batch_cells and batch_tokens"):
        make(store_uri, batch_cells=8)
    with pytest.raises(InputError, match="one of batch_cells and batch_tokens"):
        make(store_uri, batch_tokens=None)
    with pytest.raises(InputError, match="remainder='drop'"):
        make(store_uri, remainder="wrap")
    with pytest.raises(InputError, match="too small"):
        make(store_uri, world_size=700, rank=0).__len__()


def test_config_token_budget():
    base = load_config("base")
    assert base.train.micro_batch_tokens == 32768
    # a --set of one batch size replaces the preset's other one
    cells = load_config("base", ["train.micro_batch_cells=16"])
    assert (cells.train.micro_batch_cells, cells.train.micro_batch_tokens) == (16, 0)
    tokens = load_config("debug", ["train.micro_batch_tokens=4096"])
    assert tokens.train.micro_batch_tokens == 4096
    with pytest.raises(ConfigError, match="sets both"):
        load_config("debug", ["train.micro_batch_tokens=4096", "train.micro_batch_cells=8"])
    with pytest.raises(ConfigError, match="max_genes \\+ 1 = 257"):
        load_config("debug", ["train.micro_batch_tokens=200"])
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_config("debug", ["train.micro_batch_tokens=-1"])


def test_config_file_with_both_batch_sizes_is_refused(tmp_path):
    p = tmp_path / "both.toml"
    p.write_text("[train]\nmicro_batch_cells = 8\nmicro_batch_tokens = 4096\n")
    with pytest.raises(ConfigError, match="sets both"):
        load_config(p)


def test_stream_from_config_packs_by_tokens_for_pretraining_only(store_uri):
    cfg = load_config("debug", ["data.max_genes=12", "train.micro_batch_tokens=60", "data.block_size=16", "data.buffer_blocks=4"])
    s = stream_from_config(cfg, store_uri, rank=0, world_size=1)
    assert (s.batch_tokens, s.batch_cells) == (60, None)
    assert max(b.n_tokens for b in s) <= 60
    cells = stream_from_config(cfg, store_uri, rank=0, world_size=1, batch_tokens=None, remainder="wrap")
    assert (cells.batch_tokens, cells.batch_cells) == (None, cfg.train.micro_batch_cells)


@pytest.mark.slow
def test_two_rank_pretraining_with_token_budget_resumes_exactly(tmp_path):
    """The real DeepSpeed loop on 2 ranks (two launches, ~2 min on CI): token-budget batches through
    an epoch whose ranks would cut 19 and 18 batches on their own; resumed from the step-16
    checkpoint (mid-epoch, before that epoch's end), steps 17-20 repeat the uninterrupted losses."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from _ds import cleanup_shm, ds_env, free_port
    from data_store.token_budget import _rank_windows

    bin_dir = Path(sys.executable).parent
    store = str(tmp_path / "store")
    subprocess.run([str(bin_dir / "hiceller"), "synth", "--store", store, "--cells", "600", "--genes", "1000", "--tissues", "6",
                    "--no-progress"], check=True, env=ds_env())
    sets = ["data.max_genes=1000", "train.micro_batch_tokens=6144", "train.grad_accum=2", "train.steps=20",
            "train.checkpoint_every=16"]
    cfg = load_config("debug", sets)
    s = stream_from_config(cfg, store, rank=0, world_size=2)
    kw = dict(block_size=cfg.data.block_size, buffer_blocks=cfg.data.buffer_blocks, num_workers=1, shuffle=True, seed=0)
    own = [sum(len(e) for e in _rank_windows(s.cell_lengths(), s.n_cells, r, 2, 6144, epoch=1, **kw)[2]) for r in range(2)]
    assert own == [19, 18] and len(s) == 18  # epoch 0: micro batches 0-17, epoch 1: 18-35, epoch 2: 36-39

    def run(out: Path, *extra: str) -> list[dict]:
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain",
               "--config", "debug", "--store", store, "--out", str(out), "--no-progress", *[f"--set={x}" for x in sets], *extra]
        try:
            proc = subprocess.run(cmd, env=ds_env(), capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
        finally:
            cleanup_shm()
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full")
    assert [r["step"] for r in full] == list(range(1, 21))
    resumed = run(tmp_path / "resumed", "--resume", str(tmp_path / "full" / "checkpoints" / "step_00000016"))
    assert [r["step"] for r in resumed] == [17, 18, 19, 20]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[16:]], rel=1e-6, abs=1e-6)


def test_cli_refuses_a_budget_below_the_longest_cell_in_one_line(store_uri, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "hiceller", "pretrain", "--config", "base", "--store", store_uri, "--out", str(out),
                           "--set", "train.micro_batch_tokens=100"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and not out.exists()
    assert proc.stderr.strip().splitlines() == [
        "hiceller pretrain: error: config key train.micro_batch_tokens: must be >= data.max_genes + 1 = 1201 (the longest cell), got 100"
    ]


def test_cell_lengths_read_in_parts_and_set_are_the_whole_read(store_uri):
    """pretrain/run.py has each rank read a part of the counts and gathers them: the parts make the
    whole read, and a stream given them cuts the same batches; a wrong length is refused."""
    s = make(store_uri, rank=0, world_size=2)
    bounds = np.linspace(0, s.n_cells, 4).astype(int)
    parts = np.concatenate([s.cell_lengths(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])])
    fresh = make(store_uri, rank=0, world_size=2)
    np.testing.assert_array_equal(parts, fresh.cell_lengths())
    given = make(store_uri, rank=0, world_size=2)
    given.set_cell_lengths(parts)
    assert joinids_of(list(given)) == joinids_of(list(fresh))
    with pytest.raises(ValueError, match="one token count per selected cell"):
        given.set_cell_lengths(parts[:-1])
