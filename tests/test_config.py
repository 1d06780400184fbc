"""The typed run config: shipped presets, --set overrides, refusals that name the key, TOML round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hiceller.config import PRESET_DIR, RunConfig, load_config, preset_names
from hiceller.errors import ConfigError


def test_presets_are_found() -> None:
    names = preset_names()
    assert {"debug", "base"} <= set(names)
    assert names == sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_parses_and_says_its_name(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == name
    # The file spells out values, not only the defaults: every key it names reaches the config.
    import tomllib

    raw = tomllib.loads((PRESET_DIR / f"{name}.toml").read_text())
    for section, table in raw.items():
        if section == "name":
            continue
        for key, value in table.items():
            got = getattr(getattr(cfg, section), key)
            assert got == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"


def test_debug_preset_is_tiny_and_base_is_the_published_encoder() -> None:
    debug, base = load_config("debug"), load_config("base")
    assert debug.model.d_model * debug.model.n_layers < base.model.d_model * base.model.n_layers
    assert (base.model.n_layers, base.model.n_heads, base.model.d_model, base.model.dropout) == (12, 8, 512, 0.2)


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("model.d_model=128", "model", "d_model", 128),
        ("train.lr=3e-4", "train", "lr", 3e-4),
        ("train.lr=1", "train", "lr", 1.0),  # an integer is accepted for a float field
        ("deepspeed.activation_checkpointing=true", "deepspeed", "activation_checkpointing", True),
        ("finetune.loss=ce", "finetune", "loss", "ce"),  # bare word: a string
        ('data.obs_filter=tissue == "lung"', "data", "obs_filter", 'tissue == "lung"'),
        ('data.label_column="celltype"', "data", "label_column", "celltype"),
        ("train.mask_ratios=[0.5, 0.75]", "train", "mask_ratios", (0.5, 0.75)),
        ('cluster.env.NCCL_IB_DISABLE="1"', "cluster", "env", {"NCCL_IB_DISABLE": "1"}),
    ],
)
def test_set_overrides(override: str, section: str, key: str, expected: object) -> None:
    cfg = load_config("debug", [override])
    got = getattr(getattr(cfg, section), key)
    assert got == expected and type(got) is type(expected)
    # Everything else is still the preset's.
    base = load_config("debug")
    assert {k: v for k, v in cfg.flat().items() if k != f"{section}.{key}"} == {
        k: v for k, v in base.flat().items() if k != f"{section}.{key}"
    }


def test_later_override_wins() -> None:
    assert load_config("debug", ["model.n_layers=3", "model.n_layers=5"]).model.n_layers == 5


@pytest.mark.parametrize(
    "override, key",
    [
        ("optimizer.lr=1", "optimizer"),  # unknown section
        ("model.width=3", "model.width"),  # unknown key
        ('model.d_model="wide"', "model.d_model"),  # wrong type
        ("model.d_model=1.5", "model.d_model"),
        ("model.dropout=true", "model.dropout"),  # a bool is not a number
        ("deepspeed.offload_params=1", "deepspeed.offload_params"),  # an int is not a bool
        ("train.mask_ratios=0.5", "train.mask_ratios"),  # not a list
        ("cluster.env.NCCL_DEBUG=1", "cluster.env.NCCL_DEBUG"),  # env values are strings
        ("model.n_heads=7", "model.n_heads"),  # 64 is not divisible by 7
        ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
        ("model.dropout=1.5", "model.dropout"),
        ("train.mask_ratios=[0.5, 1.0]", "train.mask_ratios"),
        ("deepspeed.offload_params=true", "deepspeed.offload_params"),  # needs zero_stage 3
        ("finetune.loss=focal", "finetune.loss"),
        ("finetune.n_hvg=-1", "finetune.n_hvg"),
        ("finetune.mining_lr_scale=0", "finetune.mining_lr_scale"),
        ("finetune.mining_lr_scale=2", "finetune.mining_lr_scale"),
        ("cluster.master_port=70000", "cluster.master_port"),
    ],
)
def test_bad_override_is_a_config_error_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("debug", [override])
    assert key in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["model", "model.=3", "=3", "model.d_model.x=3"])
def test_malformed_override(override: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        load_config("debug", [override])


def test_impossible_values_fail_where_they_are_made() -> None:
    from hiceller.config import DeepSpeedConfig, ModelConfig

    with pytest.raises(ConfigError, match="model.n_heads"):
        ModelConfig(d_model=100, n_heads=8)
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        DeepSpeedConfig(zero_stage=5)
    with pytest.raises(ConfigError, match="model.dropout"):
        ModelConfig(dropout=1.5)


def test_unknown_section_and_key_in_a_file(tmp_path: Path) -> None:
    bad_section = tmp_path / "a.toml"
    bad_section.write_text('name = "a"\n[optimiser]\nlr = 1.0\n')
    with pytest.raises(ConfigError, match="optimiser.*unknown section"):
        load_config(bad_section)
    bad_key = tmp_path / "b.toml"
    bad_key.write_text('name = "b"\n[model]\nd_modle = 64\n')
    with pytest.raises(ConfigError, match=r"model\.d_modle.*unknown key"):
        load_config(bad_key)
    not_toml = tmp_path / "c.toml"
    not_toml.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(not_toml)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("huge")
    msg = str(err.value)
    assert "'huge'" in msg
    for name in preset_names():
        assert name in msg


@pytest.mark.parametrize("name", preset_names())
def test_to_toml_round_trips(tmp_path: Path, name: str) -> None:
    cfg = load_config(
        name,
        [
            'data.obs_filter=tissue == "lung" and disease != "x\\\\y"',
            "train.mask_ratios=[0.3]",
            "train.lr=2.5e-5",
            'cluster.env.NCCL_SOCKET_IFNAME="eth0"',
            "deepspeed.activation_checkpointing=true",
        ],
    )
    path = tmp_path / "round.toml"
    path.write_text(cfg.to_toml())
    back = load_config(path)
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    assert back.data.obs_filter == 'tissue == "lung" and disease != "x\\\\y"'  # not TOML: kept verbatim


def test_to_toml_round_trips_a_newline(tmp_path: Path) -> None:
    cfg = load_config("debug", ['data.obs_filter="a\\nb"'])
    assert cfg.data.obs_filter == "a\nb"
    path = tmp_path / "nl.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_defaults_are_a_valid_config() -> None:
    assert RunConfig().model.d_model % RunConfig().model.n_heads == 0
