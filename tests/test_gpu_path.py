"""The GPU training path, checked on CPU: optimizer choice and fallback, the micro-batch feed that
copies one batch ahead, bf16 autocast under ZeRO, the compile switch, what a run logs, the doctor."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from _ds import cleanup_shm, ds_env
from hiceller.config import RunConfig, load_config
from hiceller.errors import ConfigError
from pretrain import optim
from pretrain.feed import MicroBatchFeed
from pretrain.model import CellerModel

BIN = Path(sys.executable).parent


def _model() -> CellerModel:
    cfg = load_config("debug")
    torch.manual_seed(0)
    return CellerModel(cfg.model, n_genes=30, n_bins=cfg.data.n_bins)


# ------------------------------------------------------------------------------------ optimizer
def test_cpu_keeps_torch_adamw() -> None:
    """The CPU default is unchanged (the stored debug loss curve depends on it)."""
    choice = optim.make_optimizer(_model(), load_config("debug"), "cpu")
    assert choice.name == "torch_adamw" and not choice.note
    assert isinstance(choice.optimizer, torch.optim.AdamW) and not choice.optimizer.defaults["fused"]
    decay, no_decay = choice.optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])


def test_cuda_falls_back_to_torch_fused_adamw_and_says_why(monkeypatch) -> None:
    monkeypatch.setattr(optim, "_fused_adam_class", lambda: (None, "DeepSpeed's fused_adam op did not build (no nvcc)"))
    choice = optim.make_optimizer(_model(), load_config("debug"), "cuda")
    assert choice.name == "torch_adamw_fused" and "did not build" in choice.note
    assert choice.optimizer.defaults["fused"] is True
    with pytest.raises(ConfigError, match="deepspeed_fused cannot run: DeepSpeed's fused_adam op did not build"):
        optim.make_optimizer(_model(), load_config("debug", ['train.optimizer="deepspeed_fused"']), "cuda")
    choice = optim.make_optimizer(_model(), load_config("debug", ['train.optimizer="torch"']), "cuda")
    assert choice.name == "torch_adamw_fused" and not choice.note


def test_cuda_takes_deepspeed_fused_adam_where_it_builds(monkeypatch) -> None:
    class FakeFusedAdam(torch.optim.AdamW):  # same maths; stands in for the built op
        def __init__(self, groups, lr, betas, eps, adam_w_mode):
            assert adam_w_mode is True
            super().__init__(groups, lr=lr, betas=betas, eps=eps)

    monkeypatch.setattr(optim, "_fused_adam_class", lambda: (FakeFusedAdam, ""))
    choice = optim.make_optimizer(_model(), load_config("debug"), "cuda")
    assert choice.name == "deepspeed_fused_adam" and isinstance(choice.optimizer, FakeFusedAdam)


def test_optimizer_errors_and_offload() -> None:
    with pytest.raises(ConfigError, match="deepspeed_fused needs CUDA"):
        optim.make_optimizer(_model(), load_config("debug", ['train.optimizer="deepspeed_fused"']), "cpu")
    cfg = load_config("debug", ["deepspeed.offload_optimizer=true"])
    assert optim.make_optimizer(_model(), cfg, "cuda").name == "torch_adamw"
    with pytest.raises(ConfigError, match="train.optimizer: must be auto, torch or deepspeed_fused"):
        load_config("debug", ['train.optimizer="sgd"'])


# -------------------------------------------------------------------------------- config + JSON
def test_autocast_and_compile_config() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    from pretrain.ds_config import deepspeed_config

    with pytest.raises(ConfigError, match=r"train.autocast: needs deepspeed.precision = \"bf16\", got 'fp32'"):
        load_config("debug", ["train.autocast=true"])
    with pytest.raises(ConfigError, match="train.compile: works with deepspeed.zero_stage 0-2, got 3"):
        load_config("debug", ["train.compile=true", "deepspeed.zero_stage=3"])
    cfg = load_config("base", ["train.autocast=true"])
    ds = deepspeed_config(cfg, 1, "cuda")
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    parsed = DeepSpeedConfig(ds)
    assert parsed.torch_autocast_enabled and parsed.torch_autocast_dtype == torch.bfloat16
    assert not parsed.bfloat16_config.enabled
    assert "torch_autocast" not in deepspeed_config(load_config("base"), 1, "cuda")  # default unchanged
    assert load_config("base", ["train.compile=true"]).train.compile


# ------------------------------------------------------------------------------------ the feed
@dataclass
class FakeStream:
    rank: int
    n: int
    epoch: int = 0
    read: int = 0

    def dataloader(self, num_workers: int = 0):
        for i in range(self.n):
            self.read += 1
            yield (self.rank, self.epoch, i)

    def set_epoch(self, e: int) -> None:
        self.epoch = e


class FakeTask:
    def prepare(self, batch, seed, device, index=0):
        return (torch.tensor([batch[2]], device=device), seed)


def _feed_run(lookahead: bool, steps: int, accum: int, saves_after) -> tuple[list, list]:
    cfg = load_config("debug", [f"train.grad_accum={accum}", "train.data_shards_per_rank=2"])
    streams = [FakeStream(rank=0, n=3), FakeStream(rank=1, n=3)]
    feed = MicroBatchFeed(FakeTask(), streams, cfg, torch.device("cpu"), lookahead=lookahead)
    got, reads_at_save = [], []
    for step in range(steps):
        for micro in range(accum):
            last = micro + 1 == accum
            batch, (t, seed) = feed.get(step, micro, prefetch=not (last and saves_after(step + 1)))
            got.append((batch, int(t), seed))
        if saves_after(step + 1):
            reads_at_save.append([s.read for s in streams])
    feed.close()
    return got, reads_at_save


def test_feed_reads_ahead_without_changing_batches_or_seeds() -> None:
    saves = lambda step: step % 3 == 0  # noqa: E731
    plain, plain_reads = _feed_run(False, steps=7, accum=4, saves_after=saves)
    ahead, ahead_reads = _feed_run(True, steps=7, accum=4, saves_after=saves)
    assert ahead == plain  # same batches (epochs roll over), same seeds, same order
    assert len({seed for _, _, seed in plain}) == len(plain)
    # At every checkpoint nothing has been read beyond what was trained on.
    assert ahead_reads == plain_reads


def test_feed_refuses_a_skipped_micro_batch() -> None:
    cfg = load_config("debug")
    feed = MicroBatchFeed(FakeTask(), [FakeStream(rank=0, n=5)], cfg, torch.device("cpu"), lookahead=True)
    feed.get(0, 0)
    with pytest.raises(RuntimeError, match=r"\(1, 0\) was read ahead but \(2, 0\) was asked for"):
        feed.get(2, 0)


# -------------------------------------------------------------------------------------- compile
def test_compile_is_applied_in_place_and_keeps_state_dict_keys() -> None:
    from pretrain.parallelize import apply_activation_checkpointing, apply_compile, is_compiled

    model = _model()
    keys = list(model.state_dict())
    apply_activation_checkpointing(model)
    assert not is_compiled(model)
    apply_compile(model)
    assert is_compiled(model) and list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="already applied"):
        apply_compile(model)


@pytest.mark.slow
def test_compiled_debug_model_matches_eager() -> None:
    """Slow (about a minute on CPU, most of it compiling); the speed is in bench/RESULTS.md."""
    from pretrain.parallelize import apply_compile

    eager, compiled = _model().eval(), _model().eval()
    apply_compile(compiled)
    g = torch.Generator().manual_seed(0)
    for lengths in ([5, 17, 3], [9, 2, 30, 7]):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        ids = torch.randint(3, 30, (sum(lengths),), generator=g)
        vals = torch.randint(0, 51, (sum(lengths),), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, vals, cu, max(lengths)).hidden, eager(ids, vals, cu, max(lengths)).hidden,
                                       atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- what is logged
def test_setup_is_reported_and_tagged(capsys) -> None:
    from pretrain.distributed import DistInfo
    from pretrain.loop import _attention_backend, _report_setup

    class Tags:
        def __init__(self):
            self.tags = {}

        def set_tags(self, tags):
            self.tags.update(tags)

    cfg = load_config("debug")
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    backend = _attention_backend(cfg, dist.device)
    tracker = Tags()
    _report_setup(cfg, backend, optim.OptimizerChoice(None, "torch_adamw_fused", "no nvcc"), dist, tracker, "")
    assert tracker.tags == {"attention_backend": "sdpa", "optimizer": "torch_adamw_fused", "optimizer_note": "no nvcc",
                            "autocast": False, "compile": False, "device": "cpu"}
    assert "attention sdpa, optimizer torch_adamw_fused (no nvcc)" in capsys.readouterr().out


def test_explicit_gpu_backend_on_cpu_fails_in_one_line() -> None:
    from hiceller.errors import HicellerError
    from pretrain.loop import _attention_backend

    cfg = load_config("debug", ['model.attention="torch_varlen"'])
    with pytest.raises(HicellerError, match="'torch_varlen' cannot run: .*CUDA"):
        _attention_backend(cfg, torch.device("cpu"))


@pytest.mark.slow
def test_bf16_autocast_zero2_run_logs_its_setup(tmp_path) -> None:
    """A real DeepSpeed ZeRO-2 run with train.autocast on CPU (gloo): finite losses, fp32 weights, and
    the attention backend and optimizer in MLflow."""
    store = tmp_path / "store"
    env = ds_env()
    subprocess.run([str(BIN / "hiceller"), "synth", "--store", str(store), "--cells", "400", "--genes", "300",
                    "--tissues", "2", "--no-progress"], check=True, env=env, capture_output=True)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain", "--config", "debug", "--store", str(store), "--out", str(out), "--no-progress",
           "--set=train.steps=4", "--set=train.autocast=true", '--set=deepspeed.precision="bf16"']
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        cleanup_shm()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "attention sdpa, optimizer torch_adamw, autocast True" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["loss"] == r["loss"] for r in rows)
    run_id = (out / "mlflow_run_id").read_text().strip()
    with sqlite3.connect((out / "mlflow_tracking_uri").read_text().removeprefix("sqlite:///")) as db:
        tags = dict(db.execute("select key, value from tags where run_uuid = ?", (run_id,)))
    assert tags["attention_backend"] == "sdpa" and tags["optimizer"] == "torch_adamw" and tags["autocast"] == "True"


# --------------------------------------------------------------------------------------- doctor
def test_doctor_json_names_the_backend(in_process, tmp_path) -> None:
    rc, out, _ = in_process("doctor", "--json", "--out", tmp_path)
    report = json.loads(out)
    assert report["attention_backend"] == "sdpa"  # no CUDA here
    (att,) = [c for c in report["checks"] if c["name"] == "attention"]
    assert att["status"] == "ok" and att["value"] == "sdpa" and "torch_varlen (no build)" in att["detail"]
    assert rc == (0 if report["ok"] else 1)


def test_run_config_default_is_unchanged_on_cpu() -> None:
    cfg = RunConfig()
    assert (cfg.train.autocast, cfg.train.compile, cfg.train.optimizer, cfg.model.attention) == (False, False, "auto", "auto")
