"""Validation while pretraining: held-out cells, their masked-expression loss, a kNN embedding probe.

What is held out (``[validation]``, hiceller/config.py) is a pure function of the store and the
config, so every rank computes the same split without talking to the others:

* ``datasets``: those whole datasets;
* ``donors``: those donors' cells (obs is read once at start-up);
* otherwise a ``fraction`` of the store in whole blocks of ``data.block_size`` cells, a block held
  out when a seeded hash of its first joinid falls under the fraction (at least one block).

The training streams never see a held-out cell (:func:`hold_out` returns their selection). Every
``validation.every`` steps and at every checkpoint, :class:`Validator` scores on all ranks:

* ``val_loss`` (and its parts): the pretraining loss on ``loss_cells`` held-out cells (evenly
  spaced over them), each with a mask drawn from its joinid (the training objective's attention
  pattern; ``both`` is scored masked), weighted by masked tokens, summed over ranks: the same
  figure on any number of ranks;
* ``probe_accuracy`` / ``probe_macro_f1``: the ``<cls>`` embeddings of ``probe_cells`` labelled
  held-out cells under the current weights, gathered on rank 0, each cell given the majority
  label of its ``probe_k`` nearest other cells (cosine, leave-one-out).

Each rank runs the same number of forward passes (ZeRO-3 gathers parameters in every one). The
checkpoint with the lowest ``val_loss`` is the run's best (pretrain/layout.py ``write_best``):
kept by pruning, tagged in MLflow, and what ``--pretrained RUN`` loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_store.store import CorpusStore
from data_store.stream import CellSelection, stream_from_config
from hiceller.config import RunConfig
from hiceller.errors import InputError
from pretrain import layout
from pretrain.distributed import DistInfo
from pretrain.generative import GenerativeSplit
from pretrain.objective import draw_mask, pick_mask_ratio
from pretrain.task import micro_seed

__all__ = ["HeldOut", "Validator", "hold_out", "knn_probe"]

_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class HeldOut:
    """The split: selection keywords of the training streams and of the held-out cells."""

    train: dict[str, Any]
    val: dict[str, Any]
    n_val: int
    labeled: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Held-out joinids of labelled datasets (sorted): the probe's candidates."""
    describe: str = ""
    joinids: np.ndarray | None = None
    """The held-out joinids (sorted) when they were read from obs; else ``val["ranges"]`` holds them."""

    def pick(self, n: int) -> np.ndarray:
        """``n`` held-out joinids evenly spaced over all of them (sorted): a set that does not depend
        on the number of ranks."""
        sel = CellSelection(joinids=self.joinids) if self.joinids is not None else CellSelection(ranges=self.val["ranges"])
        n = min(n, len(sel))
        return np.unique(sel.take(np.linspace(0, len(sel) - 1, n).round().astype(np.int64)))


def _block_keys(starts: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) key per block start (splitmix64 of joinid and seed)."""
    x = starts.astype(np.uint64) * _MIX + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return out


def _fraction_ranges(ids, starts, stops, block: int, fraction: float, seed: int) -> list[tuple[int, int]]:
    """Held-out [start, stop) ranges: the blocks (aligned to each dataset's start) whose key < fraction."""
    firsts = [np.arange(a, b, block, dtype=np.int64) for a, b in zip(starts.tolist(), stops.tolist())]
    ends = [np.minimum(f + block, b) for f, b in zip(firsts, stops.tolist())]
    first, end = np.concatenate(firsts), np.concatenate(ends)
    keys = _block_keys(first, seed)
    held = keys < fraction
    if not held.any():
        held[np.argmin(keys)] = True
    return _merge(list(zip(first[held].tolist(), end[held].tolist())))


def _complement(spans: list[tuple[int, int]], held: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``spans`` outside ``held`` (both sorted, ``held`` inside ``spans``)."""
    out, i = [], 0
    for a, b in spans:
        cur = a
        while i < len(held) and held[i][0] < b:
            ha, hb = held[i]
            if ha > cur:
                out.append((cur, ha))
            cur = max(cur, hb)
            i += 1
        if cur < b:
            out.append((cur, b))
    return out


def _in_ranges(jids: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Whether each joinid lies in one of the sorted, disjoint ``ranges``."""
    if not ranges:
        return np.zeros(len(jids), dtype=bool)
    starts = np.array([a for a, _ in ranges], dtype=np.int64)
    ends = np.array([b for _, b in ranges], dtype=np.int64)
    k = np.searchsorted(starts, jids, side="right") - 1
    return (k >= 0) & (jids < ends[np.maximum(k, 0)])


def hold_out(store: CorpusStore, cfg: RunConfig) -> HeldOut:
    """The held-out cells of ``cfg.validation`` and the training selection without them."""
    v = cfg.validation
    ids, starts, stops = store.complete_spans()
    spans = [(int(a), int(b)) for a, b in zip(starts.tolist(), stops.tolist())]
    labeled_ids = {d.dataset_id for d in store.complete_datasets() if d.labeled}
    labeled_spans = [(int(a), int(b)) for i, a, b in zip(ids.tolist(), starts.tolist(), stops.tolist()) if i in labeled_ids]
    if v.donors:
        obs = store.obs(column_names=["donor_id"], value_filter=cfg.data.obs_filter or None)
        val = obs["donor_id"].astype(str).isin(v.donors).to_numpy()
        missing = sorted(set(v.donors) - set(obs["donor_id"].astype(str)[val]))
        if missing:
            raise InputError(f"validation.donors: no cell of donor(s) {missing} in the store{_filter_note(cfg)}")
        if val.all():
            raise InputError("validation.donors: every cell would be held out, none left to train on")
        jids = obs["soma_joinid"].to_numpy(dtype=np.int64)
        return HeldOut({"exclude_donors": list(v.donors)}, {"donors": list(v.donors)}, int(val.sum()),
                       np.sort(jids[val & _in_ranges(jids, labeled_spans)]), f"donors {list(v.donors)}", np.sort(jids[val]))
    if v.datasets:
        unknown = sorted(set(v.datasets) - set(ids.tolist()))
        if unknown:
            raise InputError(f"validation.datasets: {unknown} are not complete datasets of the store")
        held = _merge([s for i, s in zip(ids.tolist(), spans) if i in set(v.datasets)])
        what = f"datasets {list(v.datasets)}"
    else:
        held = _fraction_ranges(ids, starts, stops, cfg.data.block_size, v.fraction, cfg.train.seed)
        what = f"{v.fraction:.1%} of the cells in blocks of {cfg.data.block_size}"
    train = _complement(spans, held)
    if not train:
        raise InputError(f"validation: holding out {what} leaves no cell to train on")
    if cfg.data.obs_filter:
        jids = store.obs(column_names=[], value_filter=cfg.data.obs_filter)["soma_joinid"].to_numpy(dtype=np.int64)
        val = _in_ranges(jids, held)
        lab = jids[val & _in_ranges(jids, labeled_spans)]
        return HeldOut({"joinids": jids[~val]}, {"joinids": jids[val]}, int(val.sum()), np.sort(lab), what, np.sort(jids[val]))
    lab_sel = CellSelection(ranges=_intersect(held, labeled_spans))
    return HeldOut({"ranges": train}, {"ranges": held}, sum(b - a for a, b in held), lab_sel.joinids(), what)


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for x0, x1 in a:
        for y0, y1 in b:
            lo, hi = max(x0, y0), min(x1, y1)
            if hi > lo:
                out.append((lo, hi))
    return _merge(out)


def _filter_note(cfg: RunConfig) -> str:
    return f" (obs filter {cfg.data.obs_filter!r})" if cfg.data.obs_filter else ""


def knn_probe(emb: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float]:
    """Leave-one-out kNN (cosine) of labelled embeddings: accuracy and macro-F1 over the classes present.

    Each cell takes the majority label of its ``k`` nearest other cells; a tie goes to the class
    of the nearer neighbours."""
    n = len(emb)
    k = min(k, n - 1)
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    classes, codes = np.unique(labels, return_inverse=True)
    votes = np.zeros((n, len(classes)))
    for j in range(k):
        np.add.at(votes, (np.arange(n), codes[nearest[:, j]]), 1.0 + 1e-6 * (k - j))
    pred = votes.argmax(1)
    f1 = []
    for c in range(len(classes)):
        tp = np.sum((pred == c) & (codes == c))
        denom = np.sum(pred == c) + np.sum(codes == c)
        f1.append(2 * tp / denom if denom else 0.0)
    return {"probe_accuracy": float(np.mean(pred == codes)), "probe_macro_f1": float(np.mean(f1))}


class Validator:
    """Fixed held-out batches, scored on every rank with the engine's current weights (module docstring)."""

    def __init__(self, cfg: RunConfig, task, held: HeldOut, store: str, dist: DistInfo, gene_map: np.ndarray | None,
                 log_prefix: str = ""):
        self.cfg, self.dist = cfg, dist
        self.every = cfg.validation.every
        self.best: dict[str, Any] | None = None
        per_rank = cfg.train.micro_batch_cells
        # The loss cells are a fixed set and each cell's mask is drawn from its joinid, so the figure
        # is the same on any number of ranks (up to whole batches per rank), e.g. after a resume on fewer.
        n = min(cfg.validation.loss_cells, held.n_val) // (dist.world_size * per_rank) * dist.world_size
        if n == 0:
            raise InputError(f"validation: {held.n_val} held-out cells, fewer than one batch of {per_rank} per rank "
                             f"on {dist.world_size} rank(s); hold out more (validation.fraction, datasets, donors)")
        cells = held.pick(n * per_rank)
        stream = self._stream(store, {"ranges": [(int(j), int(j) + 1) for j in cells], "obs_filter": None}, gene_map,
                              shuffle=False, cells=len(cells), remainder="drop")
        self.loss_args = [self._masked(task, batch) for batch in stream]
        self.probe_batches: list = []
        self.probe_labels = np.zeros(0, dtype=np.int64)
        self.probe_note = self._probe(store, held, gene_map)
        if dist.is_main:
            print(f"{log_prefix}validation: {held.n_val:,} held-out cells ({held.describe}); loss on "
                  f"{len(cells):,} of them every {self.every} steps; {self.probe_note}", flush=True)

    def _masked(self, task, batch) -> tuple:
        """The task's forward arguments for ``batch`` with every cell's mask (and ratio) drawn from its joinid."""
        cu = batch.cu_seqlens
        masks = []
        for i, j in enumerate(batch.joinids.tolist()):
            g = torch.Generator().manual_seed(micro_seed(self.cfg.train.seed, 0, j, 20_000))
            ratio = pick_mask_ratio(task.mask_ratios, g)
            n = int(cu[i + 1] - cu[i])
            masks.append(draw_mask(torch.tensor([0, n], dtype=cu.dtype), n, ratio, g))
        mask = torch.cat(masks)
        split = GenerativeSplit.from_known(~mask, cu).to(self.dist.device) if task.is_generative(0) else None
        b = batch.to(self.dist.device)
        return (b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, mask.to(self.dist.device), split)

    def _stream(self, store: str, selection: dict, gene_map, shuffle: bool, cells: int, **kw):
        # A small window: the few cells needed are read, not a whole shuffle buffer.
        blocks = max(1, math.ceil(cells / self.dist.world_size / self.cfg.data.block_size) + 1)
        return stream_from_config(self.cfg, store, rank=self.dist.rank, world_size=self.dist.world_size, gene_map=gene_map,
                                  shuffle=shuffle, buffer_blocks=min(blocks, self.cfg.data.buffer_blocks), **selection, **kw)

    def _probe(self, store: str, held: HeldOut, gene_map) -> str:
        v, world, per = self.cfg.validation, self.dist.world_size, self.cfg.train.micro_batch_cells
        if v.probe_cells == 0:
            return "probe off (validation.probe_cells = 0)"
        n = min(v.probe_cells, len(held.labeled)) // (world * per) * (world * per)
        if n == 0:
            return (f"probe skipped: {len(held.labeled)} labelled held-out cells, fewer than one batch of "
                    f"{per} per rank")
        pick = held.labeled[np.linspace(0, len(held.labeled) - 1, n).round().astype(np.int64)]
        stream = self._stream(store, {"joinids": np.unique(pick)}, gene_map, shuffle=False, cells=n, labels=True,
                              label_column=self.cfg.data.label_column, remainder="drop")
        labels = []
        for batch in stream:
            self.probe_batches.append(batch.to(self.dist.device))
            labels.append(batch.labels.numpy())
        self.probe_labels = np.concatenate(labels)
        return f"kNN probe (k={v.probe_k}) on {len(self.probe_labels) * world:,} labelled cells"

    def due(self, step: int, saves_after: bool) -> bool:
        """Whether optimizer step ``step`` (1-based, done) is validated: every N steps and at every checkpoint."""
        return step % self.every == 0 or saves_after

    @torch.no_grad()
    def run(self, engine) -> dict[str, float]:
        """The validation metrics (on rank 0; the other ranks take part and get the loss). Collective."""
        was_training = engine.module.training
        engine.module.eval()
        try:
            out = self._loss(engine)
            if self.probe_batches:
                out.update(self._probe_metrics(engine))
        finally:
            engine.module.train(was_training)
        return out

    def _loss(self, engine) -> dict[str, float]:
        sums: dict[str, float] = {}
        for args in self.loss_args:
            _, metrics = engine(*args)
            w = metrics["n_masked"]
            for name in ("loss", "mse_value", "mse_expr_from_cell"):
                sums[name] = sums.get(name, 0.0) + metrics[name] * w
            sums["n_masked"] = sums.get("n_masked", 0.0) + w
        names = sorted(sums)
        t = torch.tensor([sums[n] for n in names], dtype=torch.float64)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(t)
        total = dict(zip(names, t.tolist()))
        denom = max(total.pop("n_masked"), 1.0)
        return {f"val_{n}": v / denom for n, v in total.items()}

    def _probe_metrics(self, engine) -> dict[str, float]:
        model = engine.module.model
        autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.autocast)
        embs = []
        with autocast:
            for b in self.probe_batches:
                embs.append(model(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen).cell_emb.float())
        emb = torch.cat(embs)
        if self.dist.world_size > 1:
            parts = [torch.empty_like(emb) for _ in range(self.dist.world_size)]
            torch.distributed.all_gather(parts, emb)
            emb = torch.cat(parts)
            labels = torch.from_numpy(self.probe_labels).to(self.dist.device)
            lparts = [torch.empty_like(labels) for _ in range(self.dist.world_size)]
            torch.distributed.all_gather(lparts, labels)
            labels_np = torch.cat(lparts).cpu().numpy()
        else:
            labels_np = self.probe_labels
        if not self.dist.is_main:
            return {}
        known = labels_np >= 0
        return knn_probe(emb.cpu().numpy()[known], labels_np[known], self.cfg.validation.probe_k)

    # ------------------------------------------------------------------ the best checkpoint
    def resume(self, run_dir: Path, step: int) -> None:
        """Continue with the best checkpoint recorded up to ``step``; a record from beyond it (a run
        resumed from an earlier checkpoint) is dropped."""
        best = layout.read_best(run_dir)
        if best is not None and best["step"] > step:
            if self.dist.is_main:
                layout.clear_best(run_dir)
            best = None
        self.best = best

    def after_save(self, run_dir: Path, cp: Path, step: int, val_loss: float, tracker) -> None:
        """Record checkpoint ``cp`` as the best when its validation loss is the lowest so far (rank 0 writes)."""
        if self.best is not None and val_loss >= self.best["val_loss"]:
            return
        self.best = {"step": step, "checkpoint": cp.name, "val_loss": val_loss}
        if self.dist.is_main:
            layout.write_best(run_dir, step, val_loss)
            tracker.set_tags({"best_checkpoint": cp, "best_val_loss": f"{val_loss:.6g}", "best_step": step})
