"""The one training loop: DeepSpeed engine, micro batches from CellStreams, checkpoints, MLflow.

Pretraining and fine-tuning both run through :func:`train`; what differs is the task module (its
``prepare`` and ``forward``, see ``pretrain/task.py``) and the streams. Per optimizer step:

    for each of grad_accum micro batches (alternating over this rank's data shards):
        args = task.prepare(batch, seed(step, micro, shard));  loss = engine(*args)
        engine.backward(loss);  engine.step()        # DeepSpeed steps at the boundary
    loss, metrics averaged over micro batches and all-reduced over ranks -> metrics.jsonl, MLflow

Checkpoints (pretrain/layout.py) hold the engine state and every shard's loader position, so
``--resume auto`` continues with exactly the batches and masks the uninterrupted run would have used.
On another number of ranks, it converts the checkpoint once to DeepSpeed's universal form (model
and optimizer state re-partitioned by DeepSpeed) and the loaders finish the epoch with the cells
the saved ranks had not taken (``CellStream.load_epoch_state``); the LR schedule goes on from the step.

On CUDA the loop also takes the GPU path: micro batches are copied one ahead from pinned memory on a
side stream (pretrain/feed.py), AdamW is DeepSpeed's FusedAdam where it builds (pretrain/optim.py),
``train.autocast`` runs bf16 autocast under ZeRO, ``train.compile`` compiles the encoder blocks
(pretrain/parallelize.py). The attention backend, optimizer and these switches are logged with the run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from torch import nn

from hiceller.config import RunConfig
from hiceller.errors import HicellerError
from hiceller.parallel_dims import BatchDims
from hiceller.progress import stage_bar
from pretrain import layout
from pretrain.attention import resolve_backend_for
from pretrain.distributed import DistInfo
from pretrain.ds_config import deepspeed_config
from pretrain.feed import MicroBatchFeed
from pretrain.layout import ModelSpec
from pretrain.optim import OptimizerChoice, make_optimizer
from pretrain.parallelize import apply_compile
from pretrain.task import micro_seed
from pretrain.tracking import Tracker

if TYPE_CHECKING:  # the loop only iterates streams; no store stack needed to run it
    from data_store.stream import CellStream
    from pretrain.validation import Validator

__all__ = ["LoopResult", "warmup_cosine", "train", "make_optimizer", "full_state_dict"]


@dataclass
class LoopResult:
    step: int
    losses: list[float] = field(default_factory=list)
    last_checkpoint: Path | None = None
    stopped_early: bool = False
    engine: Any = None
    """The DeepSpeed engine, for callers that go on using the trained weights (fine-tuning)."""
    setup: dict[str, Any] = field(default_factory=dict)
    """What the run computed with (attention backend, optimizer, autocast, compile), as logged."""


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _compute_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype activations (and so attention inputs) have in this run."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.deepspeed.precision]


def _attention_backend(cfg: RunConfig, device: torch.device) -> str:
    """The attention backend this run's model.attention resolves to; an explicit backend that cannot
    run here fails now, in one line, instead of inside the first forward pass."""
    head_dim = cfg.model.d_model // cfg.model.n_heads
    try:
        return resolve_backend_for(cfg.model.attention, device, _compute_dtype(cfg), head_dim)
    except RuntimeError as e:
        raise HicellerError(str(e)) from None


def _apply_compile(task: nn.Module) -> None:
    model = getattr(task, "model", None)
    if model is None or not hasattr(model, "blocks"):
        raise HicellerError(f"train.compile: {type(task).__name__} has no .model with encoder blocks to compile")
    apply_compile(model)


def _report_setup(cfg: RunConfig, attention: str, opt: OptimizerChoice, dist: DistInfo, tracker: Tracker,
                  log_prefix: str) -> dict[str, Any]:
    """What this run computes with, on stdout and as MLflow tags (rank 0); returns the tags."""
    tags = {
        "attention_backend": attention,
        "optimizer": opt.name,
        "autocast": cfg.train.autocast,
        "compile": cfg.train.compile,
        "device": dist.device.type,
    }
    if opt.note:
        tags["optimizer_note"] = opt.note
    if not dist.is_main:
        return tags
    tracker.set_tags(tags)
    note = f" ({opt.note})" if opt.note else ""
    print(f"{log_prefix}attention {attention}, optimizer {opt.name}{note}, autocast {cfg.train.autocast}, "
          f"compile {cfg.train.compile}", flush=True)
    if cfg.train.compile and attention == "sdpa":
        print(f"{log_prefix}warning: train.compile with SDPA attention recompiles for every new mix of cell lengths "
              "(290x slower than eager on CPU, bench/RESULTS.md \"GPU path\"); it is meant for the flash kernels",
              file=sys.stderr, flush=True)
    return tags


def _all_reduce_mean(values: list[float], dist: DistInfo) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.world_size > 1:
        torch.distributed.all_reduce(t)
        t /= dist.world_size
    return t.tolist()


def _all_reduce_sum(values: list[float], dist: DistInfo) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.world_size > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def _build_engine(cfg: RunConfig, task: nn.Module, dist: DistInfo, tracker: Tracker, log_prefix: str, load_universal: bool = False):
    """The DeepSpeed engine around ``task`` with the loop's AdamW and warm-up + cosine schedule;
    ``load_universal``: it is to load a universal checkpoint."""
    import deepspeed

    device_kind = "cuda" if dist.device.type == "cuda" else "cpu"
    ds_cfg = deepspeed_config(cfg, dist.world_size, device_kind)
    if load_universal:
        ds_cfg["checkpoint"] = {"load_universal": True}
    attention = _attention_backend(cfg, dist.device)
    if cfg.train.compile:
        _apply_compile(task)
    opt = make_optimizer(task, cfg, dist.device)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt.optimizer, lambda s: warmup_cosine(s, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
    )
    # What ds_to_universal needs to convert a checkpoint of this engine (a plain model: the format
    # version only); the engine saves this module attribute with every checkpoint.
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    setattr(task, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=opt.optimizer, lr_scheduler=sched, config=ds_cfg)
    return engine, sched, _report_setup(cfg, attention, opt, dist, tracker, log_prefix)


def _start_step(engine, run_dir: Path, cp: Path | None, meta: dict | None, universal: bool, streams: list["CellStream"],
                dist: DistInfo, log_prefix: str) -> int:
    """The step to start from (resumed from ``cp`` or 0); metrics.jsonl trimmed to match it."""
    step = 0
    if cp is not None:
        step = _load(engine, cp, meta, universal, streams, dist)
        if dist.is_main:
            moved = f" (saved on {meta['world_size']} rank(s))" if meta["world_size"] != dist.world_size else ""
            print(f"{log_prefix}resumed from {cp}{moved} at step {step} on {dist.world_size} rank(s)", flush=True)
    metrics_path = run_dir / layout.METRICS
    if dist.is_main and metrics_path.exists():
        if step == 0:
            metrics_path.unlink()
        else:
            _trim_metrics(metrics_path, step)
    return step


def _micro_batches(engine, feed: MicroBatchFeed, grad_accum: int, step: int, saves_after: bool) -> tuple[dict[str, float], int, int]:
    """One optimizer step: forward/backward of every micro batch; (metric sums, cells, tokens)."""
    sums: dict[str, float] = {}
    cells = tokens = 0
    for micro in range(grad_accum):
        last = micro + 1 == grad_accum
        # no prefetch past a checkpoint: the saved loader state must not count a batch not yet used
        batch, args = feed.get(step, micro, prefetch=not (last and saves_after))
        loss, metrics = engine(*args)
        engine.backward(loss)
        engine.step()
        for name, v in metrics.items():
            sums[name] = sums.get(name, 0.0) + v
        cells += batch.n_cells
        tokens += batch.n_tokens
    return sums, cells, tokens


def _record(engine, sched, dist: DistInfo, step: int, grad_accum: int, sums: dict, cells: int, tokens: int, dt: float) -> dict:
    """The step's metrics row: losses averaged over micro batches and ranks, throughput, memory."""
    names = sorted(sums)
    means = _all_reduce_mean([sums[n] / grad_accum for n in names], dist)
    cells_all, tokens_all = _all_reduce_sum([cells, tokens], dist)
    record: dict[str, Any] = dict(zip(names, means))
    grad_norm = engine.get_global_grad_norm()
    record.update({
        "step": step,
        "lr": sched.get_last_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "cells_per_s": cells_all / dt,
        "tokens_per_s": tokens_all / dt,
        "memory_mb": _memory_mb(dist.device),
    })
    if not math.isfinite(record["loss"]):
        raise HicellerError(f"loss is {record['loss']} at step {step}: lower train.lr or check the data")
    return record


def _log(record: dict, cfg: RunConfig, run_dir: Path, tracker: Tracker, bar) -> None:
    """Rank 0: the row into metrics.jsonl, every log_every steps into MLflow, the progress bar."""
    step = record["step"]
    with (run_dir / layout.METRICS).open("a") as f:
        f.write(json.dumps(record) + "\n")
    if step % cfg.train.log_every == 0 or step == cfg.train.steps or "val_loss" in record:
        tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step)
    if bar:
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)


def train(
    cfg: RunConfig,
    task: nn.Module,
    streams: list["CellStream"],
    run_dir: Path,
    dist: DistInfo,
    tracker: Tracker,
    *,
    spec: ModelSpec,
    resume: str | None = None,
    stop_after_steps: int | None = None,
    progress: bool = True,
    log_prefix: str = "",
    validator: "Validator | None" = None,
) -> LoopResult:
    """Run ``cfg.train.steps`` optimizer steps of ``task`` on ``streams`` (this rank's data shards);
    every checkpoint carries ``spec``, what the weights mean (pretrain/layout.py). A ``validator``
    (pretrain/validation.py) scores held-out cells on its steps and keeps the best checkpoint."""
    dims = BatchDims.from_train(cfg.train, dist.world_size)
    run_dir = Path(run_dir)
    cp = _resume_point(run_dir, resume, dist) if resume else None
    meta = _read_meta(cp) if cp is not None else None
    universal = meta is not None and meta["world_size"] != dist.world_size and _partitioned(cp)
    if universal:
        _convert_universal(cp, dist, log_prefix)
    engine, sched, setup = _build_engine(cfg, task, dist, tracker, log_prefix, load_universal=universal)
    step = _start_step(engine, run_dir, cp, meta, universal, streams, dist, log_prefix)
    if validator is not None:
        validator.resume(run_dir, step)
    feed = MicroBatchFeed(task, streams, cfg, dist.device, lookahead=dist.device.type == "cuda")
    result = LoopResult(step=step, setup=setup)
    bar = None
    if dist.is_main and progress:
        bar = stage_bar(cfg.train.steps, f"{log_prefix}train", "steps", initial=step)
    steps_this_run, t_last = 0, time.perf_counter()
    while step < cfg.train.steps:
        torch.manual_seed(micro_seed(cfg.train.seed, step, 0, 10_000 + dist.rank))  # dropout, reproducibly
        saves_after = _saves_after(step + 1, steps_this_run + 1, cfg, stop_after_steps)
        sums, cells, tokens = _micro_batches(engine, feed, dims.grad_accum, step, saves_after)
        step, steps_this_run = step + 1, steps_this_run + 1
        now = time.perf_counter()
        record = _record(engine, sched, dist, step, dims.grad_accum, sums, cells, tokens, now - t_last)
        if validator is not None and validator.due(step, saves_after):
            record.update(validator.run(engine))  # every rank takes part
        t_last = time.perf_counter()  # validation time is not training throughput
        result.losses.append(record["loss"])
        if dist.is_main:
            _log(record, cfg, run_dir, tracker, bar)
        if saves_after:
            result.last_checkpoint = save(engine, run_dir, step, streams, cfg, dist, spec)
            if dist.is_main:
                tracker.set_tags({"last_checkpoint": result.last_checkpoint})
            if validator is not None:
                validator.after_save(run_dir, result.last_checkpoint, step, record["val_loss"], tracker)
        if stop_after_steps is not None and steps_this_run >= stop_after_steps and step < cfg.train.steps:
            result.stopped_early = True
            break
    if bar:
        bar.close()
    result.step, result.engine = step, engine
    feed.close()
    return result


def _saves_after(step: int, steps_this_run: int, cfg: RunConfig, stop_after_steps: int | None) -> bool:
    """Whether the loop checkpoints once optimizer step ``step`` (1-based) is done."""
    stop = stop_after_steps is not None and steps_this_run >= stop_after_steps
    return step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stop


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The module's whole state dict in fp32 on CPU, on every rank (ZeRO-3 gathers partitions)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def save(engine, run_dir: Path, step: int, streams: list["CellStream"], cfg: RunConfig, dist: DistInfo, spec: ModelSpec) -> Path:
    """A collective checkpoint; COMPLETE is written by rank 0 only after every rank has saved."""
    root = layout.checkpoint_root(run_dir)
    tag = layout.tag_for(step)
    cp = root / tag
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as a RuntimeError. This rank may have failed between
        # DeepSpeed's own barriers while the others wait in one, so no collective can agree on the
        # failure here: stop now; the launcher (or the peers' collective timeout) ends the others.
        raise HicellerError(_save_error(run_dir, cp, e)) from None
    ok = torch.tensor([1])
    try:
        layout.write_json_atomic(cp / f"loader_rank{dist.rank}.json", [s.state_dict() for s in streams])
        if dist.is_main:
            layout.write_spec(cp, cfg, spec)
    except OSError as e:
        ok = torch.tensor([0])
        err = e
    if dist.world_size > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if not ok.item():
        msg = f"could not write checkpoint {cp}"
        if "err" in locals():
            msg += f": {err.strerror or err}"
        raise HicellerError(msg + "; earlier checkpoints are intact")
    if dist.world_size > 1:
        torch.distributed.barrier()
    if dist.is_main:
        try:
            layout.mark_complete(cp, {"step": step, "world_size": dist.world_size, "shards": len(streams), "time": time.time()})
        except OSError as e:
            raise HicellerError(_save_error(run_dir, cp, e)) from None
        layout.prune(run_dir, cfg.train.keep_last)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return cp


def _resume_point(run_dir: Path, resume: str, dist: DistInfo) -> Path | None:
    if resume == "auto":
        return layout.latest_complete(run_dir)
    return layout.resolve_checkpoint(Path(resume))


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics rows of steps up to the resume point: a run killed after its last checkpoint
    wrote rows for steps it now redoes (and maybe a torn last line), which would appear twice."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20


def _save_error(run_dir: Path, cp: Path, e: BaseException) -> str:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
    try:
        free = shutil.disk_usage(cp.parent).free / 2**20
        last = layout.latest_complete(run_dir)
        need = _dir_mb(last) if last is not None else 0.0
    except OSError:
        free = need = None
    if free is not None and free < need:
        reason = f"the disk looks full ({free:.1f} MiB free, the last checkpoint took {need:.1f} MiB): {reason}"
    elif free is not None:
        reason += f" ({free:.1f} MiB free there)"
    return f"could not write checkpoint {cp}: {reason}; earlier checkpoints are intact"


def _earlier_hint(cp: Path) -> str:
    earlier = [p for p in layout.list_checkpoints(cp.parent.parent) if p.name < cp.name]
    return f"; resume from an earlier one with --resume {earlier[-1]}" if earlier else ""


def _check_files(cp: Path) -> None:
    """Refuse, by name, a torch file of the checkpoint that is not a whole zip archive (the format of
    torch.save): a truncated file is caught here instead of deep inside DeepSpeed."""
    for f in sorted(cp.glob("*.pt")):
        try:
            with f.open("rb") as fh:
                if fh.read(2) not in (b"PK", b""):
                    continue  # a legacy (non-zip) torch file: left to DeepSpeed to load
            with zipfile.ZipFile(f) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise HicellerError(f"checkpoint file {f} is damaged ({e}); not resuming from it{_earlier_hint(cp)}") from None


def _read_meta(cp: Path) -> dict[str, Any]:
    try:
        meta = json.loads((cp / layout.META).read_text())
        int(meta["world_size"]), int(meta["shards"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HicellerError(f"checkpoint file {cp / layout.META} is unreadable ({_first_line(e)}){_earlier_hint(cp)}") from None
    return meta


def _partitioned(cp: Path) -> bool:
    """Whether DeepSpeed partitioned the optimizer state of ``cp`` over its ranks (ZeRO 1-3, or the
    bf16 optimizer): it wrote ``*optim_states.pt`` files. Otherwise (ZeRO 0 in fp32) the whole state
    is in the model states file and loads on any number of ranks as it is."""
    return any(cp.glob("*optim_states.pt"))


def _convert_universal(cp: Path, dist: DistInfo, log_prefix: str) -> None:
    """Rank 0 converts ``cp`` to DeepSpeed's universal form (once; pretrain/layout.py) while the
    others wait; every rank fails in one line if it could not."""
    err = None
    if dist.is_main:
        print(f"{log_prefix}checkpoint {cp} was saved on another number of ranks: converting it to a universal "
              "checkpoint", flush=True)
        try:
            _check_files(cp)
            layout.universal_checkpoint(cp)
        except HicellerError as e:
            err = e
    ok = torch.tensor([0 if err else 1])
    if dist.world_size > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if err is not None:
        raise err
    if not ok.item():
        raise HicellerError(f"checkpoint {cp} could not be converted to a universal checkpoint (see rank 0)")


def _group_settings(engine) -> list[dict[str, Any]]:
    """Each optimizer param group's settings but its parameters (weight decay, betas, lr scale)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.optimizer.param_groups]


def _restore_group_settings(engine, groups: list[dict[str, Any]]) -> None:
    """Undo two slips of ZeRO-3's universal load (DeepSpeed 0.19, stage3.py
    load_hp_checkpoint_state_from_checkpoint_dir_stage3); ZeRO 1/2 load each group by itself.

    It gives every param group the settings of the first, so the no-decay group (biases, norms)
    would decay from then on: each group gets its own settings back, and the resumed scheduler's lr.
    It gives every parameter partition one shared ``step`` tensor, which torch's AdamW increments in
    place once per group at every step: each gets its own copy (seen as a loss drifting from the
    uninterrupted run's from the second step after the resume, tests/test_resume_world.py)."""
    if engine.zero_optimization_stage() != 3:
        return
    opt = engine.optimizer.optimizer
    for g, saved, lr in zip(opt.param_groups, groups, engine.lr_scheduler.get_last_lr()):
        g.update({k: v for k, v in saved.items() if k != "lr"}, lr=lr)
    for state in opt.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _loader_states(cp: Path, meta: dict[str, Any]) -> list[dict]:
    """Every stream state of the saved world, in stream-rank order (rank r's shard s is r*S+s)."""
    states = []
    for r in range(int(meta["world_size"])):
        path = cp / f"loader_rank{r}.json"
        try:
            states += json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise HicellerError(f"checkpoint file {path} is unreadable ({_first_line(e)}){_earlier_hint(cp)}") from None
    return states


def _load(engine, cp: Path, meta: dict[str, Any], universal: bool, streams: list["CellStream"], dist: DistInfo) -> int:
    """Engine and loader state of ``cp``, from its universal form when ``universal``."""
    _check_files(cp)
    try:
        if universal:
            groups = _group_settings(engine)
            path, client = engine.load_checkpoint(str(cp), tag=layout.UNIVERSAL, load_module_strict=True)
            _restore_group_settings(engine, groups)
        else:
            path, client = engine.load_checkpoint(str(cp.parent), tag=cp.name, load_module_strict=True)
    except Exception as e:  # never continue from a partial load
        raise HicellerError(f"checkpoint {cp} could not be loaded ({_first_line(e)}){_earlier_hint(cp)}") from None
    if path is None:
        raise HicellerError(f"checkpoint {cp} could not be loaded by DeepSpeed (files missing or damaged)")
    states = _loader_states(cp, meta)
    try:
        for s in streams:
            s.load_epoch_state(states)
    except HicellerError as e:
        raise HicellerError(f"checkpoint {cp}: {e}") from None
    return int(client["step"])
