"""cluster/: DeepSpeed JSON, hostfiles, launcher commands, the SLURM script and the doctor.

Golden files live in tests/golden/; regenerate them with ``HICELLER_UPDATE_GOLDEN=1 pytest
tests/test_cluster.py`` and review the diff. Nothing here trains: the launcher tests stop at
the command line (or at a recording stand-in for pdsh/srun).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.ds_config import deepspeed_config, dumps_deepspeed_config, write_deepspeed_config
from cluster.hostfile import parse_hostfile, parse_resource_spec, read_hostfile, resolve_resources
from cluster.launch import (
    LaunchRequest,
    Placement,
    build_launch_command,
    deepspeed_env_text,
    launch_env,
    prepare_launch,
    shell_line,
)
from cluster.slurm import CONFIG_EOF, SlurmJob, sbatch_script, validate_time
from hiceller.cli import main as hiceller_main
from hiceller.config import load_config
from hiceller.errors import ConfigError, HicellerError, InputError

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("HICELLER_UPDATE_GOLDEN") == "1"
BIN = Path(sys.executable).parent
HICELLER = str(BIN / "hiceller")


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"missing golden file {path}; create it with HICELLER_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file (HICELLER_UPDATE_GOLDEN=1 to accept)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_parse(cmd: list[str]):
    """How DeepSpeed's own runner reads our argv."""
    from deepspeed.launcher.runner import parse_args

    assert cmd[0] == "deepspeed"
    return parse_args(cmd[1:])


@pytest.fixture
def store(tmp_path: Path) -> Path:
    p = tmp_path / "store"
    p.mkdir()
    return p


@pytest.fixture
def hostfile(tmp_path: Path) -> Path:
    p = tmp_path / "hostfile"
    p.write_text("# two local names, two slots each\n127.0.0.1 slots=2\n\n127.0.0.2 slots=2  # second\n")
    return p


# --------------------------------------------------------------------------- DeepSpeed JSON

GOLDEN_DS = [(preset, stage) for preset in ("debug", "base") for stage in range(4)]
# debug runs on CPU ranks; base is the 4 nodes x 8 GPUs layout.
GOLDEN_LAYOUT = {"debug": (2, "cpu"), "base": (32, "cuda")}


@pytest.mark.parametrize("preset, stage", GOLDEN_DS)
def test_deepspeed_json_golden(preset, stage):
    world, device = GOLDEN_LAYOUT[preset]
    cfg = load_config(preset, [f"deepspeed.zero_stage={stage}"])
    assert_golden(f"ds_{preset}_stage{stage}.json", dumps_deepspeed_config(deepspeed_config(cfg, world, device)))


@pytest.mark.parametrize("preset, stage", GOLDEN_DS)
def test_deepspeed_json_accepted_by_deepspeed(preset, stage):
    """DeepSpeed's pydantic config (extra keys forbidden) reads what we write, as we meant it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    _, device = GOLDEN_LAYOUT[preset]
    cfg = load_config(preset, [f"deepspeed.zero_stage={stage}"])
    ds = DeepSpeedConfig(deepspeed_config(cfg, 1, device))  # no process group: world size 1
    assert ds.zero_optimization_stage == stage
    assert ds.train_batch_size == cfg.train.micro_batch_cells * cfg.train.grad_accum
    assert ds.gradient_accumulation_steps == cfg.train.grad_accum
    assert ds.gradient_clipping == cfg.train.grad_clip
    assert ds.bfloat16_config.enabled == (cfg.deepspeed.precision == "bf16")
    assert not ds.float16_config.enabled
    assert ds.optimizer_name is None and ds.scheduler_name is None


def test_deepspeed_json_batch_and_sections():
    cfg = load_config("base")
    ds = deepspeed_config(cfg, 32, "cuda")
    assert ds["train_batch_size"] == 32 * 4 * 32
    assert ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"] == {"enabled": True}
    assert "optimizer" not in ds and "scheduler" not in ds and "fp16" not in ds
    assert ds["wall_clock_breakdown"] is False and ds["steps_per_print"] > 10**8


def test_fp16_dynamic_loss_scaling_on_cuda():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config("base", ['deepspeed.precision="fp16"'])
    ds = deepspeed_config(cfg, 8, "cuda")
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and "bf16" not in ds
    parsed = DeepSpeedConfig(deepspeed_config(cfg, 1, "cuda"))
    assert parsed.float16_config.enabled and parsed.float16_config.loss_scale == 0


def test_fp16_on_cpu_is_config_error():
    cfg = load_config("debug", ['deepspeed.precision="fp16"'])
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        deepspeed_config(cfg, 1, "cpu")


def test_offload_sections():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(
        "base", ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"]
    )
    gpu = deepspeed_config(cfg, 8, "cuda")["zero_optimization"]
    assert gpu["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert gpu["offload_param"] == {"device": "cpu", "pin_memory": True}
    cpu = deepspeed_config(cfg, 8, "cpu")
    assert cpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is False
    # A client torch AdamW under offload must be allowed explicitly.
    assert cpu["zero_force_ds_cpu_optimizer"] is False
    parsed = DeepSpeedConfig(deepspeed_config(cfg, 1, "cuda"))
    assert parsed.zero_config.offload_param is not None and parsed.zero_config.offload_optimizer is not None
    assert "offload_optimizer" not in deepspeed_config(load_config("base"), 8, "cuda")["zero_optimization"]


def test_zero_stage_and_device_errors():
    with pytest.raises(ConfigError, match="zero_stage: must be 0, 1, 2 or 3, got 4"):
        load_config("debug", ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match="device must be cpu or cuda"):
        deepspeed_config(load_config("debug"), 1, "tpu")
    with pytest.raises(ConfigError, match="world_size must be >= 1"):
        deepspeed_config(load_config("debug"), 0, "cpu")


def test_write_deepspeed_config(tmp_path):
    path = write_deepspeed_config(tmp_path / "sub" / "ds.json", load_config("debug"), 2, "cpu")
    assert json.loads(path.read_text())["train_batch_size"] == 32
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.slow
def test_deepspeed_engine_steps_with_our_json(tmp_path):
    """Each ZeRO stage (and offload) initialises a real engine on CPU with a client AdamW and steps.

    Single process, world size 1; slow only the first time (DeepSpeed JIT-builds its CPU comm op).
    """
    script = r"""
import os, json, sys, torch, deepspeed
from hiceller.config import load_config
from pretrain.ds_config import deepspeed_config
losses = {}
for stage, extra in [(0, []), (1, []), (2, ["deepspeed.offload_optimizer=true"]), (3, []),
                     (3, ["deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"])]:
    cfg = load_config("debug", [f"deepspeed.zero_stage={stage}", *extra])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, 1, "cpu"))
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    out = []
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    losses[f"{stage}{extra}"] = out
print("LOSSES " + json.dumps(losses))
"""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = json.loads(r.stdout.split("LOSSES ", 1)[1])
    first = next(iter(losses.values()))
    assert first[2] < first[0]
    for v in losses.values():  # one rank: every layout is the same maths
        assert v == pytest.approx(first, rel=1e-5)


# --------------------------------------------------------------------------- hostfiles


def test_parse_hostfile_comments_and_order(hostfile):
    hf = read_hostfile(hostfile)
    assert hf.slots == {"127.0.0.1": 2, "127.0.0.2": 2}
    assert [e.line for e in hf.entries] == [2, 4]
    assert hf.world_size == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ("127.0.0.1 slots=2\n127.0.0.1 slots=4\n", r"line 2: host '127.0.0.1' is already listed on line 1"),
        ("127.0.0.1 slots=0\n", r"line 1: slots must be >= 1, got 0"),
        ("127.0.0.1 slots=two\n", r"line 1: slots must be an integer, got 'two'"),
        ("# only\n127.0.0.1\n", r"line 2: expected 'HOST slots=N', got '127.0.0.1'"),
        ("127.0.0.1 slots=2 extra\n", r"line 1: expected 'HOST slots=N'"),
        ("# nothing\n\n", r"no 'HOST slots=N' lines"),
    ],
)
def test_hostfile_errors_name_file_and_line(tmp_path, text, message):
    p = tmp_path / "hosts.txt"
    p.write_text(text)
    with pytest.raises(InputError, match=message) as e:
        read_hostfile(p)
    assert str(p) in str(e.value)


def test_missing_hostfile(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_hostfile(tmp_path / "nope")


def test_resource_spec_syntax():
    assert parse_resource_spec("h1:0,1@h2") == {"h1": [0, 1], "h2": []}
    assert parse_resource_spec("h1:1@h1:0,1") == {"h1": [0, 1]}
    for bad, msg in [("h1:", "slot '' is not"), ("h1:a", "slot 'a'"), ("@h2", "expected HOST"), ("", "empty")]:
        with pytest.raises(InputError, match=msg):
            parse_resource_spec(bad, "--include")


def test_resolve_resources_like_deepspeed():
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_inclusion_exclusion

    hf = parse_hostfile("a slots=4\nb slots=4\nc slots=2\n")
    cases = [("b:1,3@a", "", None), ("", "a:0@c", None), ("", "b", None), ("", "", 2), ("c@a:2", "", None)]
    for include, exclude, nodes in cases:
        ours = resolve_resources(hf, include, exclude, nodes)
        theirs = parse_inclusion_exclusion(hf.slots, include, exclude)
        theirs = apply_num_nodes_and_gpus(theirs, nodes or -1, -1)
        assert ours == dict(theirs), (include, exclude, nodes)


@pytest.mark.parametrize(
    "include, exclude, nodes, message",
    [
        ("z", "", None, r"--include: host 'z' is not in hostfile"),
        ("a:4", "", None, r"--include: slot 4 does not exist on host 'a'"),
        ("a", "b", None, "cannot be used together"),
        ("", "a@b", None, "leaves no slots"),
        ("a", "", 1, "--nodes cannot be combined"),
        ("", "", 3, "--nodes 3: hostfile <hostfile> has 2 host"),
    ],
)
def test_resolve_resources_errors(include, exclude, nodes, message):
    hf = parse_hostfile("a slots=4\nb slots=4\n")
    with pytest.raises(InputError, match=message):
        resolve_resources(hf, include, exclude, nodes)


# --------------------------------------------------------------------------- launcher commands


def test_launch_command_hostfile_mode(tmp_path, store, hostfile):
    port = free_port()
    run = tmp_path / "run"
    req = LaunchRequest(config="base", store=str(store), out=run, hostfile=hostfile,
                        include="127.0.0.1:0,1@127.0.0.2:1", master_port=port, device="cpu")
    cmd, env = prepare_launch(req)
    assert cmd == [
        "deepspeed", "--hostfile", str(hostfile), "--include", "127.0.0.1:0,1@127.0.0.2:1",
        "--master_port", str(port), "--module", "pretrain",
        "--config", str(run / "config.toml"), "--store", str(store), "--out", str(run),
    ]
    args = ds_parse(cmd)
    assert (args.hostfile, args.include, args.master_port, args.module) == (str(hostfile), req.include, port, True)
    assert (args.user_script, args.user_args) == ("pretrain", cmd[-6:])
    assert env == {"NCCL_DEBUG": "WARN", "DS_ACCELERATOR": "cpu", "DS_ENV_FILE": str(run / ".deepspeed_env")}
    # Three ranks: train_batch_size = micro 32 x accum 4 x 3.
    assert json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 384
    assert (run / ".deepspeed_env").read_text() == "NCCL_DEBUG=WARN\nDS_ACCELERATOR=cpu\n"
    assert load_config(run / "config.toml") == load_config("base")


def test_launch_command_no_ssh_mode(tmp_path, store, hostfile):
    port = free_port()
    run = tmp_path / "run"
    req = LaunchRequest(config="debug", store=str(store), out=run, module="finetune", resume="auto",
                        hostfile=hostfile, no_ssh=True, node_rank=1, master_addr="127.0.0.1",
                        master_port=port, device="cpu", overrides=("deepspeed.zero_stage=3",))
    cmd, _ = prepare_launch(req)
    assert cmd == [
        "deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(port), "--module", "finetune",
        "--config", str(run / "config.toml"), "--store", str(store), "--out", str(run), "--resume", "auto",
    ]
    args = ds_parse(cmd)
    assert (args.no_ssh, args.node_rank, args.master_addr, args.user_script) == (True, 1, "127.0.0.1", "finetune")
    assert load_config(run / "config.toml").deepspeed.zero_stage == 3
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3


def test_launch_no_ssh_without_hostfile_writes_one(tmp_path, store):
    run = tmp_path / "run"
    req = LaunchRequest(config="debug", store=str(store), out=run, nodes=3, gpus_per_node=2, no_ssh=True,
                        node_rank=2, master_addr="127.0.0.1", master_port=free_port(), device="cpu")
    cmd, _ = prepare_launch(req)
    assert cmd[:6] == ["deepspeed", "--hostfile", str(run / "hostfile"), "--no_ssh", "--node_rank", "2"]
    assert (run / "hostfile").read_text() == "node-0 slots=2\nnode-1 slots=2\nnode-2 slots=2\n"
    assert json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 16 * 6


def test_launch_single_node_command():
    cmd = build_launch_command(Placement(num_nodes=1, num_gpus=4, master_port=29600), module="pretrain",
                               run_dir=Path("/r"), store="s3://bucket/corpus")
    assert cmd == ["deepspeed", "--num_nodes", "1", "--num_gpus", "4", "--master_port", "29600",
                   "--module", "pretrain", "--config", "/r/config.toml", "--store", "s3://bucket/corpus",
                   "--out", "/r"]
    args = ds_parse(cmd)
    assert (args.num_nodes, args.num_gpus) == (1, 4)


def test_dry_run_prints_one_runnable_line(tmp_path, store, capsys):
    run = tmp_path / "my run"
    port = free_port()
    rc = hiceller_main(["launch", "--config", "debug", "--store", str(store), "--out", str(run),
                        "--gpus-per-node", "2", "--master-port", str(port), "--device", "cpu", "--dry-run",
                        "--set", 'cluster.env.OMP_NUM_THREADS="1"'])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("\n") == 1
    words = shlex.split(out)
    assert words[:3] == ["OMP_NUM_THREADS=1", "DS_ACCELERATOR=cpu", f"DS_ENV_FILE={run / '.deepspeed_env'}"]
    assert words[3:] == ["deepspeed", "--num_nodes", "1", "--num_gpus", "2", "--master_port", str(port),
                         "--module", "pretrain", "--config", str(run / "config.toml"), "--store", str(store),
                         "--out", str(run)]
    assert sorted(p.name for p in run.iterdir()) == [".deepspeed_env", "config.toml", "ds_config.json"]


def test_deepspeed_env_reaches_remote_ranks(tmp_path, store, hostfile):
    """Run the real `deepspeed` runner (ssh mode) with recording stand-ins for ssh and pdsh.

    DeepSpeed only reads .deepspeed_env on this path; the pdsh command must carry our exports.
    """
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ssh").write_text('#!/bin/sh\necho 127.0.0.1\n')
    (fake / "pdsh").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$HC_PDSH_ARGS"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("STRAY_FROM_HOME=1\n")  # must not be picked up
    record = tmp_path / "pdsh.args"
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "HOME": str(home), "HC_PDSH_ARGS": str(record)}
    env.pop("DS_ENV_FILE", None)
    r = subprocess.run(
        [HICELLER, "launch", "--config", "base", "--store", str(store), "--out", str(run), "--hostfile",
         str(hostfile), "--master-port", str(free_port()), "--device", "cpu", "--set", 'cluster.env.HC_X="a b"'],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    remote = record.read_text().splitlines()
    exports = next(a for a in remote if a.startswith("export "))
    assert "export NCCL_DEBUG=WARN;" in exports
    assert 'export HC_X="a b";' in exports
    assert "export DS_ACCELERATOR=cpu;" in exports
    assert "STRAY_FROM_HOME" not in exports
    assert remote[remote.index("-w") + 1] == "127.0.0.1,127.0.0.2"
    assert remote[-7:] == ["pretrain", "--config", str(run / "config.toml"), "--store", str(store), "--out", str(run)]


def test_deepspeed_help_lists_our_flags():
    r = subprocess.run([str(BIN / "deepspeed"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for flag in ("--hostfile", "--include", "--exclude", "--num_nodes", "--num_gpus", "--no_ssh", "--node_rank",
                 "--master_addr", "--master_port", "--module"):
        assert flag in r.stdout, flag


def test_env_values_deepspeed_cannot_carry():
    cfg = load_config("debug", ['cluster.env.BAD="$HOME"'])
    with pytest.raises(ConfigError, match=r"cluster.env.BAD: value '\$HOME'"):
        launch_env(cfg, "cpu")
    cfg = load_config("debug", ['cluster.env."1X"="v"'])
    with pytest.raises(ConfigError, match="not a valid environment variable name"):
        launch_env(cfg, "cpu")
    assert deepspeed_env_text({"A": "1", "B": "x y"}) == "A=1\nB=x y\n"
    assert shell_line(["deepspeed", "a b"], {"K": "v w"}) == "K='v w' deepspeed 'a b'"


# --------------------------------------------------------------------------- user errors, through the CLI


def _launch_args(store: Path, out: Path, *extra: str) -> list[str]:
    return ["launch", "--config", "debug", "--store", str(store), "--out", str(out), "--device", "cpu",
            "--dry-run", *extra]


LAUNCH_ERRORS = [
    ("node_rank", ["--hostfile", "{hostfile}", "--no-ssh", "--node-rank", "2", "--master-addr", "127.0.0.1"],
     "--node-rank 2 is outside 0..1 for 2 node(s)"),
    ("zero_stage", ["--set", "deepspeed.zero_stage=5"], "deepspeed.zero_stage: must be 0, 1, 2 or 3, got 5"),
    ("fp16_cpu", ["--set", 'deepspeed.precision="fp16"'], "fp16 needs CUDA"),
    ("bad_hostfile", ["--hostfile", "{bad_hostfile}"], "line 2: expected 'HOST slots=N'"),
    ("dup_hostfile", ["--hostfile", "{dup_hostfile}"], "line 2: host '127.0.0.1' is already listed on line 1"),
    ("missing_hostfile", ["--hostfile", "{missing}"], "does not exist"),
    ("gpus_mismatch", ["--hostfile", "{hostfile}", "--gpus-per-node", "8"],
     "host '127.0.0.1' has slots=2 but --gpus-per-node is 8"),
    ("include_host", ["--hostfile", "{hostfile}", "--include", "127.0.0.9"], "host '127.0.0.9' is not in hostfile"),
    ("include_slot", ["--hostfile", "{hostfile}", "--include", "127.0.0.1:2"], "slot 2 does not exist"),
    ("include_no_hostfile", ["--include", "127.0.0.1"], "--include/--exclude need --hostfile"),
    ("nodes_no_hostfile", ["--nodes", "2"], "--nodes 2 needs --hostfile"),
    ("no_ssh_incomplete", ["--hostfile", "{hostfile}", "--no-ssh"], "--no-ssh needs --node-rank and --master-addr"),
    ("rank_without_no_ssh", ["--node-rank", "0"], "--node-rank needs --no-ssh"),
    ("bad_master_addr", ["--no-ssh", "--node-rank", "0", "--master-addr", "no-such-host.invalid"], "does not resolve"),
    ("gpus_zero", ["--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
    ("bad_env", ["--set", 'cluster.env.X="a\\"b"'], "cluster.env.X"),
]


@pytest.mark.parametrize("case, extra, message", LAUNCH_ERRORS, ids=[c[0] for c in LAUNCH_ERRORS])
def test_launch_user_errors(tmp_path, store, hostfile, capsys, case, extra, message):
    files = {"hostfile": hostfile, "missing": tmp_path / "missing"}
    for name, text in [("bad_hostfile", "127.0.0.1 slots=2\n127.0.0.2 slots:2\n"),
                       ("dup_hostfile", "127.0.0.1 slots=2\n127.0.0.1 slots=2\n")]:
        files[name] = tmp_path / name
        files[name].write_text(text)
    run = tmp_path / "run"
    args = [a.format(**files) for a in _launch_args(store, run, *extra)]
    rc = hiceller_main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("hiceller launch: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not run.exists()  # nothing written, nothing started


def test_launch_port_in_use(tmp_path, store, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = hiceller_main(_launch_args(store, tmp_path / "run", "--master-port", str(port)))
    err = capsys.readouterr().err
    assert rc == 2 and f"master port {port} on 127.0.0.1 is already in use" in err


def test_launch_refuses_visible_devices_deepspeed_would_override(tmp_path, store, monkeypatch):
    req = LaunchRequest(config="base", store=str(store), out=tmp_path / "run", gpus_per_node=2,
                        master_port=free_port(), device="cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(InputError, match="CUDA_VISIBLE_DEVICES=2,3 but DeepSpeed's launcher would use GPUs 0-1"):
        prepare_launch(req)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what a cgroup-limited job sees: fine
    cmd, env = prepare_launch(req)
    assert cmd[1:5] == ["--num_nodes", "1", "--num_gpus", "2"] and "DS_ACCELERATOR" not in env


def test_launch_missing_store(tmp_path, capsys):
    rc = hiceller_main(_launch_args(tmp_path / "nostore", tmp_path / "run"))
    assert rc == 2 and "store" in capsys.readouterr().err


def test_user_error_through_console_script_has_no_traceback(tmp_path, store):
    r = subprocess.run([HICELLER, *_launch_args(store, tmp_path / "run", "--set", "deepspeed.zero_stage=7")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "hiceller launch: error: config key deepspeed.zero_stage: must be 0, 1, 2 or 3, got 7"
    ]
    assert r.stdout == ""


def test_cluster_modules_do_not_import_torch():
    code = ("import sys, cluster.cli, cluster.launch, cluster.slurm, pretrain.ds_config, cluster.hostfile, "
            "cluster.doctor, hiceller.parallel_dims; cluster.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'mlflow')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# --------------------------------------------------------------------------- SLURM

SLURM_ARGS = ["--config", "base", "--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00",
              "--partition", "gpu", "--store", "corpus.soma", "--out", "runs/base-4x8",
              "--tracking-uri", "http://127.0.0.1:5000"]


def test_slurm_script_golden_and_bash_syntax(tmp_path, capsys):
    rc = hiceller_main(["cluster", "slurm", *SLURM_ARGS])
    script = capsys.readouterr().out
    assert rc == 0
    # The embedded config is checked against the config itself, so that a new config field does
    # not churn this golden file; the golden holds everything else, with a marker in its place.
    head, rest = script.split(f"<<'{CONFIG_EOF}'\n", 1)
    embedded, tail = rest.split(f"\n{CONFIG_EOF}\n", 1)
    assert embedded + "\n" == load_config("base").to_toml()
    assert_golden("slurm_base_4x8.sbatch", f"{head}<<'{CONFIG_EOF}'\n<config.toml of preset base>\n{CONFIG_EOF}\n{tail}")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu"):
        assert line in script.splitlines()
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_python_m_cluster_matches_hiceller(capsys):
    hiceller_main(["cluster", "slurm", *SLURM_ARGS])
    expected = capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "cluster", "cluster", "slurm", *SLURM_ARGS],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == expected
    r = subprocess.run([sys.executable, "-m", "cluster", "cluster", "slurm", *[("1:2" if a == "24:00:00" else a) for a in SLURM_ARGS]],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "hiceller cluster: error: --time '1:2': expected HH:MM:SS or D-HH:MM:SS"
    ]


def _run_sbatch(tmp_path: Path, script_text: str, hosts: list[str]) -> subprocess.CompletedProcess:
    """Execute an sbatch script with stand-ins for scontrol, srun and deepspeed that record what they
    get, SLURM having given the job ``hosts``."""
    script = tmp_path / "job.sbatch"
    script.write_text(script_text)
    fake = tmp_path / "bin"
    fake.mkdir()
    listing = "".join(f"{h}\\n" for h in hosts)
    stubs = {
        "scontrol": f'printf "{listing}"',
        # One task per node, in order, with SLURM_NODEID set as SLURM does; options are dropped.
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\n'
                'for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i "$@" || exit 1; done',
        "deepspeed": 'printf "%s\\n" "$@" > "rank.$SLURM_NODEID.args"\n'
                     'echo "${MLFLOW_TRACKING_URI-} ${NCCL_DEBUG-} ${NCCL_SOCKET_IFNAME-}" > "rank.$SLURM_NODEID.env"',
    }
    for name, body in stubs.items():
        (fake / name).write_text(f"#!/bin/bash\nset -eu\n{body}\n")
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": f"n[1-{len(hosts)}]",
           "SLURM_NNODES": str(len(hosts)), "SLURM_JOB_ID": "12345"}
    return subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_slurm_script_runs_one_launcher_per_node(tmp_path):
    cfg = load_config("base", ['cluster.env.NCCL_SOCKET_IFNAME="eth0"'])
    job = SlurmJob(nodes=2, gpus_per_node=8, time="1-00:00:00", store="corpus.soma", out="run dir",
                   tracking_uri="http://127.0.0.1:5000")
    r = _run_sbatch(tmp_path, sbatch_script(job, cfg), ["127.0.0.1", "127.0.0.2"])
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run dir"
    assert (run / "hostfile").read_text() == "127.0.0.1 slots=8\n127.0.0.2 slots=8\n"
    assert load_config(run / "config.toml") == cfg
    for rank in (0, 1):
        args = ds_parse(["deepspeed", *(tmp_path / f"rank.{rank}.args").read_text().splitlines()])
        assert (args.no_ssh, args.node_rank, args.num_nodes, args.num_gpus) == (True, rank, 2, 8)
        assert (args.hostfile, args.master_addr, args.master_port) == ("run dir/hostfile", "127.0.0.1", 10000 + 12345)
        assert args.module and args.user_script == "pretrain"
        assert args.user_args == ["--config", "run dir/config.toml", "--store", "corpus.soma", "--out", "run dir",
                                  "--resume", "auto"]
        env_line = (tmp_path / f"rank.{rank}.env").read_text().split()
        assert env_line == ["http://127.0.0.1:5000", "WARN", "eth0"]


def test_slurm_job_requeued_on_fewer_nodes_runs_on_them(tmp_path):
    """A 4-node job that SLURM starts (or requeues) on 3 nodes: 3 launchers, a 3-line hostfile, and
    --resume auto (which continues a run saved on another world size)."""
    job = SlurmJob(nodes=4, min_nodes=2, gpus_per_node=8, time="01:00:00", store="corpus.soma", out="run")
    script = sbatch_script(job, load_config("base"))
    assert "#SBATCH --nodes=2-4" in script.splitlines()
    r = _run_sbatch(tmp_path, script, ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "hostfile").read_text().splitlines() == [f"10.0.0.{i} slots=8" for i in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.glob("rank.*.args")) == ["rank.0.args", "rank.1.args", "rank.2.args"]
    for rank in range(3):
        args = ds_parse(["deepspeed", *(tmp_path / f"rank.{rank}.args").read_text().splitlines()])
        assert (args.node_rank, args.num_nodes, args.master_addr) == (rank, 3, "10.0.0.1")
        assert args.user_args[-2:] == ["--resume", "auto"]
    with pytest.raises(InputError, match="--min-nodes"):
        SlurmJob(nodes=2, min_nodes=3, gpus_per_node=8, time="01:00:00", store="s", out="o")


@pytest.mark.parametrize("bad", ["24:00", "1:60:00", "10:00:61", "2-24:00:00", "00:00:00", "ab:cd:ef", "-1:00:00"])
def test_slurm_time_validation(bad):
    with pytest.raises(InputError, match="--time"):
        validate_time(bad)


def test_slurm_time_accepts():
    for good in ("24:00:00", "72:30:00", "2-12:00:00", "00:00:01"):
        assert validate_time(good) == good


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(nodes=0), "--nodes must be >= 1"),
        (dict(gpus_per_node=0), "--gpus-per-node must be >= 1"),
        (dict(partition="gpu; rm -rf"), "not a SLURM partition name"),
        (dict(master_port=80), "--master-port"),
        (dict(store=""), "must not be empty"),
    ],
)
def test_slurm_job_errors(kwargs, message):
    base = dict(nodes=2, gpus_per_node=8, time="01:00:00", store="s", out="o")
    with pytest.raises(InputError, match=message):
        SlurmJob(**{**base, **kwargs})


def test_slurm_checks_the_deepspeed_config():
    job = SlurmJob(nodes=2, gpus_per_node=8, time="01:00:00", store="s", out="o")
    with pytest.raises(HicellerError, match="world_size|zero_stage"):
        sbatch_script(job, load_config("base", ["deepspeed.zero_stage=9"]))


# --------------------------------------------------------------------------- doctor


def test_doctor_json(tmp_path):
    import pyarrow as pa
    import tiledbsoma

    exp = tmp_path / "exp"
    with tiledbsoma.Experiment.create(str(exp)) as e:
        e.add_new_dataframe("obs", schema=pa.schema([("cell_type", pa.string())]), index_column_names=["soma_joinid"],
                           domain=[(0, 9)])
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run([HICELLER, "doctor", "--json", "--store", str(exp), "--out", str(tmp_path / "ckpt")],
                       env=env, capture_output=True, text=True, timeout=180)
    report = json.loads(r.stdout)  # library banners went to stderr
    status = {c["name"]: c["status"] for c in report["checks"]}
    for name in ("python", "torch", "deepspeed", "deepspeed-ops", "tiledbsoma", "store", "mlflow"):
        assert status[name] == "ok", report
    assert status["flash-attn"] in ("ok", "warn")
    assert r.returncode == (0 if report["ok"] else 1)
    fa = next(c for c in report["checks"] if c["name"] == "flash-attn")
    if fa["status"] == "warn":
        assert "hiceller[gpu]" in fa["fix"]


def test_doctor_failures_are_reported(tmp_path, monkeypatch):
    from cluster import doctor

    (store,) = doctor.check_store(str(tmp_path / "not-a-store"))
    assert store.status == "fail" and "does not open as a SOMA Experiment" in store.detail and store.fix
    import tiledbsoma

    tiledbsoma.Experiment.create(str(tmp_path / "empty")).close()
    (empty,) = doctor.check_store(str(tmp_path / "empty"))
    assert empty.status == "warn" and "without obs" in empty.detail
    (mlflow,) = doctor.check_tracking(f"http://127.0.0.1:{free_port()}")
    assert mlflow.status == "fail" and "does not answer" in mlflow.detail

    class Usage:
        free = int(0.5 * 1024**3)

    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda _: Usage)
    (disk,) = doctor.check_disk(tmp_path / "a" / "b")
    assert disk.status == "fail" and str(tmp_path) in disk.detail
    text = doctor.format_check(disk)
    assert text.startswith("fail  disk") and "[fix: " in text
    assert json.loads(doctor.checks_to_json([disk]))["ok"] is False
