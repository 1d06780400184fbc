"""The rounds of a fine-tuning run: phase 1, then hard-mining rounds, then the best round's bundle.

    round 0 (phase1): every training cell, finetune.epochs
    round r >= 1:     the hard set + replay of round r-1's weights (finetune/mining.py),
                      finetune.mining_epochs at train.lr * finetune.mining_lr_scale
    after each round: validation macro-F1; the rounds stop after finetune.mining_patience rounds
                      without a gain; the best round (0 when mining did not help) is kept
    at the end:       the best round's test metrics, RUN/model (a bundle), RUN/summary.json

Every round is a run of the shared training loop (pretrain/loop.py) with a ClassifierTask, so
DeepSpeed, checkpoints and metrics are those of pretraining; in MLflow each round is a child run of
the fine-tuning run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_store.stream import CellStream, stream_from_config
from finetune.calibration import fit_calibration
from finetune.data import FinetuneData
from finetune.metrics import labelled_report, softmax, write_eval_artifacts
from finetune.mining import BestRoundTracker, HardMiner, HardMiningRule
from finetune.plots import plot_per_class_f1, plot_reliability, plot_umap
from finetune.task import ClassifierTask, predict_logits
from hiceller import __version__
from hiceller.config import RunConfig
from hiceller.errors import HicellerError
from pretrain import layout
from pretrain.distributed import DistInfo
from pretrain.layout import ModelSpec, TrainedModel
from pretrain.loop import full_state_dict, train
from pretrain.model import CellerModel
from pretrain.plots import plot_loss_curve
from pretrain.tracking import Tracker

__all__ = ["RoundContext", "run_rounds"]


@dataclass
class RoundContext:
    """Everything the rounds share: the config, the ranks, the data, the pretrained model."""

    cfg: RunConfig
    dist: DistInfo
    data: FinetuneData
    pretrained: TrainedModel
    out: Path
    progress: bool = True

    @property
    def spec(self) -> ModelSpec:
        """The classifier's spec: the pretrained architecture and vocabulary, this run's classes."""
        d = self.data
        return dataclasses.replace(
            self.pretrained.spec, max_genes=self.cfg.data.max_genes, labels=d.names, label_counts=d.counts.tolist(),
            input_genes=d.input_genes, head=self.cfg.finetune.head, wide_input=self.wide_input,
        )

    @property
    def wide_input(self) -> str:
        """What the classifier's linear part reads ("bins" when it has none: nothing to read)."""
        f = self.cfg.finetune
        return f.wide_input if f.head != "transformer" else "bins"

    def stream(self, idx: np.ndarray, shuffle: bool, local: bool = False) -> CellStream:
        """The cells at positions ``idx``; ``local``: all of them on this rank (evaluation)."""
        cfg = self.cfg
        return stream_from_config(
            self.cfg,
            self.data.store_uri,
            rank=0 if local else self.dist.rank,
            world_size=1 if local else self.dist.world_size,
            shuffle=shuffle,
            obs_filter=None,
            joinids=self.data.joinids[idx],
            labels=True,
            label_names=self.data.names,
            remainder="wrap",
            gene_map=self.data.gene_map,
            expression=self.wide_input == "expression",
            batch_tokens=None,  # fine-tuning batches by micro_batch_cells
        )

    def task(self, state: dict[str, torch.Tensor], with_head: bool) -> ClassifierTask:
        """A ClassifierTask with ``state``'s weights (the encoder only, or the whole classifier)."""
        cfg, spec = self.cfg, self.pretrained.spec
        torch.manual_seed(cfg.train.seed)
        model = CellerModel(spec.model_cfg, n_genes=len(spec.vocab), n_bins=spec.n_bins)
        f = cfg.finetune
        task = ClassifierTask(model, len(self.data.names), f.loss, self.data.counts, f.ginf_mu, f.ginf_sigma, head=f.head,
                              wide_lr_scale=f.wide_lr_scale, wide_input=self.wide_input, wide_l1=f.wide_l1,
                              wide_l1_class_power=f.wide_l1_class_power)
        if task.reads_expression and self.data.gene_scale is not None:
            task.wide.gene_scale.copy_(torch.from_numpy(self.data.gene_scale))
        if with_head:
            task.load_state_dict(state, strict=True)
        else:
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}, strict=True)
        if f.freeze_encoder:
            for p in task.model.parameters():
                p.requires_grad_(False)
        return task

    @property
    def device(self) -> torch.device:
        return self.dist.device if self.dist.device.type == "cuda" else torch.device("cpu")


def _round_config(cfg: RunConfig, rnd: int, steps: int) -> RunConfig:
    f = cfg.finetune
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, steps=steps, checkpoint_every=steps, warmup_steps=min(cfg.train.warmup_steps, steps // 10),
        data_shards_per_rank=1, lr=cfg.train.lr * (1.0 if rnd == 0 else f.mining_lr_scale),
    ))


def _train_round(ctx: RoundContext, rnd: int, task: ClassifierTask, train_idx: np.ndarray, tracker: Tracker) -> dict:
    """One round through the shared loop; returns the trained state dict (fp32, every rank)."""
    stream = ctx.stream(train_idx, shuffle=True)
    epochs = ctx.cfg.finetune.epochs if rnd == 0 else ctx.cfg.finetune.mining_epochs
    steps = max(1, epochs * len(stream) // ctx.cfg.train.grad_accum)
    rcfg = _round_config(ctx.cfg, rnd, steps)
    run_dir = layout.round_dir(ctx.out, rnd)
    if ctx.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tracker.log_params({"round": rnd, "train_cells": len(train_idx), "steps": steps, "epochs": epochs, "lr": rcfg.train.lr})
    name = layout.round_name(rnd)
    result = train(rcfg, task, [stream], run_dir, ctx.dist, tracker, spec=ctx.spec, progress=ctx.progress, log_prefix=f"{name} ")
    return full_state_dict(result.engine)


def predict(ctx: RoundContext, task: ClassifierTask, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Logits of the cells ``idx`` in that order (every rank computes the same)."""
    pred = predict_logits(task, ctx.stream(idx, shuffle=False, local=True), ctx.device)
    # wrap mode may repeat cells to fill the last batch: keep the first occurrence, in idx order
    first = {j: i for i, j in reversed(list(enumerate(pred["joinids"].tolist())))}
    order = np.array([first[j] for j in ctx.data.joinids[idx].tolist()])
    return {k: v[order] for k, v in pred.items()}


def evaluate(ctx: RoundContext, task: ClassifierTask, idx: np.ndarray, keep_embeddings: bool = False) -> dict[str, Any]:
    """The classification report of the cells ``idx``, with what its artifacts are drawn from."""
    if len(idx) == 0:
        raise HicellerError("nothing to evaluate: the validation split is empty")
    y = ctx.data.label_ids(idx)
    pred = predict(ctx, task, idx)
    proba = softmax(pred["logits"])
    report = labelled_report(y, proba, ctx.data.names, ctx.data.counts, ctx.cfg.finetune.rare_class_threshold)
    known = y >= 0
    out = {"report": report, "y": y[known], "pred": proba[known].argmax(1)}
    if keep_embeddings:
        out["embeddings"], out["labels"] = pred["embeddings"], ctx.data.labels[idx]
        out["predicted"] = np.array(ctx.data.names, dtype=object)[proba.argmax(1)]
    return out


def _calibrate(ctx: RoundContext, task: ClassifierTask) -> dict[str, Any]:
    """The bundle's trust settings (finetune/calibration.py) from the validation logits and the
    training cells' embeddings of the kept weights, with the probabilities for the reliability plot."""
    split = ctx.data.split
    val, train = predict(ctx, task, split.val_idx), predict(ctx, task, split.train_idx)
    val_y, train_y = ctx.data.label_ids(split.val_idx), ctx.data.label_ids(split.train_idx)
    cal = fit_calibration(val["logits"], val_y, train["embeddings"], train_y, train["n_genes"], len(ctx.data.names))
    known = val_y >= 0
    return {"calibration": cal, "val_y": val_y[known], "val_logits": val["logits"][known]}


def _log_calibration(tracker: Tracker, c: dict[str, Any], folder: Path) -> None:
    cal = c["calibration"]
    curves = {"raw": softmax(c["val_logits"]), f"T = {cal.temperature:.2f}": cal.probabilities(c["val_logits"])}
    tracker.log_artifact(plot_reliability(curves, c["val_y"], folder / "val_reliability.png"))
    tracker.log_metrics({"val_ece_raw": cal.ece_before, "val_ece_calibrated": cal.ece_after, "temperature": cal.temperature,
                         "min_confidence": cal.min_confidence}, step=0)


def _log_umap(ctx: RoundContext, tracker: Tracker, test: dict[str, Any]) -> None:
    """UMAP of the held-out cells' embeddings, true and predicted labels side by side."""
    png = plot_umap(test["embeddings"], {"true label": test["labels"], "predicted": test["predicted"]},
                    ctx.out / "test_umap.png", seed=ctx.cfg.train.seed)
    tracker.log_artifact(png)


def _scalars(report: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _log_eval(ctx: RoundContext, tracker: Tracker, ev: dict[str, Any], folder: Path, prefix: str) -> None:
    """Confusion matrix, per-class F1 (CSV and bars) and the report of one evaluation, as artifacts."""
    files = write_eval_artifacts(ev["report"], ev["y"], ev["pred"], ctx.data.names, folder, f"{prefix}_")
    files.append(plot_per_class_f1(ev["report"], folder / f"{prefix}_per_class_f1.png", f"{prefix}: per-class F1"))
    for f in files:
        tracker.log_artifact(f)


def _log_loss_curve(tracker: Tracker, folder: Path) -> None:
    rows = [json.loads(line) for line in (folder / layout.METRICS).read_text().splitlines() if line.strip()]
    if rows:
        tracker.log_artifact(plot_loss_curve(rows, folder / "loss_curve.png", ylabel="classification loss"))


def _report_round(ctx: RoundContext, rnd: int, tracker: Tracker, val: dict, n_train: int, hard, scores, train_idx) -> None:
    """Rank 0: the round's validation metrics, hard-set make-up and artifacts, to MLflow and stdout."""
    folder = layout.round_dir(ctx.out, rnd)
    _log_eval(ctx, tracker, val, folder, "val")
    _log_loss_curve(tracker, folder)
    tracker.log_metrics({f"val_{k}": v for k, v in _scalars(val["report"]).items()}, step=rnd)
    if hard is not None:
        tracker.log_metrics({"hard_set_size": float(len(hard.hard_idx)), "replay_size": float(len(hard.replay_idx))}, step=rnd)
        tracker.log_params({"hard_composition": json.dumps(hard.composition)[:5000]})
        frame = hard.to_frame(ctx.data.labels[train_idx], scores, joinids=ctx.data.joinids[train_idx])
        frame.to_parquet(folder / "hard_cells.parquet")
        tracker.log_artifact(folder / "hard_cells.parquet")
    tracker.finish()
    r = val["report"]
    rare = "n/a" if r.get("rare_class_f1") is None else f"{r['rare_class_f1']:.3f}"
    print(f"{layout.round_name(rnd)}: {n_train} training cells, val accuracy {r['accuracy']:.3f}, "
          f"macro-F1 {r['macro_f1']:.3f}, rare-class F1 {rare}", flush=True)


def run_rounds(ctx: RoundContext, parent: Tracker) -> dict[str, Any]:
    """Phase 1 and the mining rounds; the best round's weights, validation report and round number."""
    f, split = ctx.cfg.finetune, ctx.data.split
    task = ctx.task(ctx.pretrained.state_dict, with_head=False)
    stopper, miner = BestRoundTracker(patience=f.mining_patience), HardMiner(HardMiningRule.from_config(f))
    rng = np.random.default_rng(ctx.cfg.train.seed)
    best: dict[str, Any] = {}
    train_idx, hard, scores = split.train_idx, None, None  # the mining selection round rnd > 0 trains on
    for rnd in range(f.mining_rounds + 1):
        child = parent.child(layout.round_dir(ctx.out, rnd), layout.round_name(rnd), "mlflow_run_id") if ctx.dist.is_main else parent
        state = _train_round(ctx, rnd, task, train_idx, child)
        scored = ctx.task(state, with_head=True)
        val = evaluate(ctx, scored, split.val_idx)
        if ctx.dist.is_main:
            _report_round(ctx, rnd, child, val, len(train_idx), hard, scores, split.train_idx)
        if val["report"]["macro_f1"] > best.get("val", {}).get("macro_f1", -1.0):
            best = {"round": rnd, "val": val["report"], "state": state}
        if rnd == f.mining_rounds or not stopper.update(rnd, val["report"]["macro_f1"]):
            break
        # Mining: score every training cell with this round's weights; the next round trains on
        # the hard set plus a replay sample, starting from these weights.
        y = ctx.data.label_ids(split.train_idx)
        scores = miner.score(predict(ctx, scored, split.train_idx)["logits"], y)
        hard = miner.select(scores, y, rng)
        if len(hard.hard_idx) == 0:
            if ctx.dist.is_main:
                print(f"no hard cell left after {layout.round_name(rnd)}: mining stops", flush=True)
            break
        train_idx = split.train_idx[hard.train_idx]
        task = ctx.task(state, with_head=True)
    return best


def finish(ctx: RoundContext, best: dict[str, Any], parent: Tracker) -> dict[str, Any]:
    """The best round's test metrics, bundle (RUN/model) and summary (RUN/summary.json)."""
    split = ctx.data.split
    # A held-out disease may hold only classes training never saw: nothing to score, not a failure.
    scorable = len(split.test_idx) > 0 and bool((ctx.data.label_ids(split.test_idx) >= 0).any())
    if len(split.test_idx) and not scorable and ctx.dist.is_main:
        print("warning: no held-out cell has a class seen in training; no test metrics", flush=True)
    final = ctx.task(best["state"], with_head=True)
    test = evaluate(ctx, final, split.test_idx, keep_embeddings=True) if scorable else None
    calibration = _calibrate(ctx, final)
    # The training diseases ride in the summary, so a bundle (metrics.json, also after export) can
    # tell annotation which query cells come from a condition the model never saw.
    summary = {"round": best["round"], "val": best["val"], "test": test["report"] if test else None,
               "train_diseases": ctx.data.train_diseases}
    if ctx.dist.is_main:
        parent.log_metrics({"best_round": float(best["round"]), **{f"best_val_{k}": v for k, v in _scalars(best["val"]).items()}}, step=0)
        if test:
            parent.log_metrics({f"test_{k}": v for k, v in _scalars(test["report"]).items()}, step=0)
            _log_eval(ctx, parent, test, ctx.out, "test")
            _log_umap(ctx, parent, test)
        parent.set_tags({"best_round": best["round"]})
        _log_calibration(parent, calibration, ctx.out)
        provenance = {"loss": ctx.cfg.finetune.loss, "pretrained": str(ctx.pretrained.source), "store": ctx.data.store_uri,
                      "finetune_run": str(ctx.out.resolve()), "mlflow_run_id": parent.run_id, "tracking_uri": parent.tracking_uri,
                      "hiceller_version": __version__, "torch_version": torch.__version__}
        model = TrainedModel(ctx.spec, best["state"], ctx.out, summary, provenance, calibration["calibration"].as_dict())
        layout.write_bundle(ctx.out / layout.BUNDLE_DIR, model)
        layout.write_summary(ctx.out, summary)
    if ctx.dist.world_size > 1:
        torch.distributed.barrier()
    return summary
