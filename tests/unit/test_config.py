"""Configs: typed --set overrides, strict loading with suggestions, JSON round-trip, run-dir guard, CLI helpers."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from typing import Literal

import pytest

from crossdistill.config import (
    add_config_args,
    apply_overrides,
    config_from_args,
    config_hash,
    dumps_config,
    flat_keys,
    from_dict,
    load_config,
    prepare_run_dir,
    save_config,
    to_dict,
    warn_ignored,
)
from crossdistill.errors import ConfigError


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-4  # learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 100  # total steps
    seed: int = 0  # base seed


@dataclass(kw_only=True)
class LogConfig:
    every: int = 10  # log interval


@dataclass(kw_only=True)
class RunConfig:
    family: Literal["sd3", "flux"] = "sd3"  # teacher family
    teacher: str | None = None  # teacher folder
    use_ema: bool = False  # keep an EMA
    resolutions: list[int] = field(default_factory=lambda: [256])  # training resolutions
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer
    train: TrainConfig = field(default_factory=TrainConfig)  # loop
    log: LogConfig = field(default_factory=LogConfig)  # logging


PRESETS = {"small": RunConfig, "flux": lambda: RunConfig(family="flux", optim=OptimConfig(lr=5e-6))}


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(
        RunConfig(),
        [
            "optim.lr=1e-5",
            "family=flux",
            "use_ema=true",
            "resolutions=[256,512]",
            "teacher=/models/sd3",
            "optim.betas=[0.5, 0.99]",
            "train.max_steps=7",
        ],
    )
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.family == "flux" and cfg.use_ema is True
    assert cfg.resolutions == [256, 512] and cfg.optim.betas == (0.5, 0.99)
    assert cfg.teacher == "/models/sd3" and cfg.train.max_steps == 7
    assert apply_overrides(cfg, ["teacher=none"]).teacher is None
    assert apply_overrides(cfg, ["resolutions=128,64"]).resolutions == [128, 64]
    assert RunConfig().optim.lr == 1e-4, "overrides must not mutate the original"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'"),
        ("lr=1", "did you mean 'optim.lr'"),
        ("nope.x=1", "unknown key 'nope.x'"),
        ("train.max_steps=1.5", "'train.max_steps' expects an int"),
        ("optim.lr=fast", "'optim.lr' expects a float"),
        ("use_ema=maybe", "expects a bool"),
        ("family=sdxl", "must be one of 'sd3', 'flux'"),
        ("resolutions=[a,b]", "'resolutions[0]' expects an int"),
        ("optim.betas=[1,2,3]", "expects 2 values"),
        ("optim=3", "group of options"),
        ("no_equals_sign", "not KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        apply_overrides(RunConfig(), [override])


def test_dict_round_trip_is_strict():
    cfg = apply_overrides(RunConfig(), ["family=flux", "optim.betas=[0.1,0.2]"])
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(ConfigError, match="unknown key 'optim.lrate'; did you mean 'optim.lr'"):
        from_dict(RunConfig, {"optim": {"lrate": 1.0}})
    with pytest.raises(ConfigError, match="'train.max_steps' expects an int"):
        from_dict(RunConfig, {"train": {"max_steps": "10"}})
    # Missing keys keep defaults (configs of older versions still load).
    assert from_dict(RunConfig, {"family": "flux"}) == RunConfig(family="flux")


def test_save_load_config(tmp_path):
    cfg = apply_overrides(RunConfig(), ["optim.lr=3e-5"])
    save_config(cfg, tmp_path / "c.json")
    assert load_config(RunConfig, tmp_path / "c.json") == cfg
    assert not list(tmp_path.glob(".*.tmp")), "atomic write leaves no temp file"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(RunConfig, tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "missing.json")


def test_flat_keys():
    assert "optim.lr" in flat_keys(RunConfig) and "log.every" in flat_keys(RunConfig())
    assert "optim" not in flat_keys(RunConfig)


def test_run_dir_refuses_another_runs_config(tmp_path):
    run = tmp_path / "run"
    cfg = RunConfig()
    prepare_run_dir(run, cfg)
    assert load_config(RunConfig, run / "config.json") == cfg
    # Same run, resume-safe changes: accepted, and config.json records them.
    more = apply_overrides(cfg, ["train.max_steps=500", "log.every=1"])
    prepare_run_dir(run, more)
    assert load_config(RunConfig, run / "config.json").train.max_steps == 500
    assert config_hash(more) == config_hash(cfg)
    # Another run: refused, naming every differing key, and config.json is untouched.
    other = apply_overrides(cfg, ["optim.lr=1", "family=flux"])
    before = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"differs in: family, optim.lr\); pass a new --run-dir"):
        prepare_run_dir(run, other)
    assert (run / "config.json").read_text() == before
    assert config_hash(other) != config_hash(cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_run_dir(run, cfg, resume=False)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser, PRESETS)
    return parser.parse_args(argv)


def test_cli_helpers(tmp_path):
    assert config_from_args(_parse([]), PRESETS) == RunConfig()
    cfg = config_from_args(_parse(["--preset", "flux", "--set", "optim.lr=1e-3", "--set", "use_ema=yes"]), PRESETS)
    assert cfg.family == "flux" and cfg.optim.lr == 1e-3 and cfg.use_ema
    save_config(cfg, tmp_path / "c.json")
    again = config_from_args(_parse(["--config", str(tmp_path / "c.json"), "--set", "train.seed=3"]), PRESETS)
    assert again.family == "flux" and again.train.seed == 3
    assert json.loads(dumps_config(again))["train"]["seed"] == 3
    assert _parse(["--print-config"]).print_config
    with pytest.raises(ConfigError, match="either --preset or --config"):
        config_from_args(_parse(["--preset", "flux", "--config", str(tmp_path / "c.json")]), PRESETS)
    with pytest.raises(SystemExit):
        _parse(["--preset", "nope"])


def test_warn_ignored_only_for_values_someone_set(caplog):
    with caplog.at_level(logging.WARNING, logger="crossdistill.config"):
        assert not warn_ignored(RunConfig(), "optim.lr", "the optimizer is frozen")
        cfg = apply_overrides(RunConfig(), ["optim.lr=0.5"])
        assert warn_ignored(cfg, "optim.lr", "the optimizer is frozen")
        assert not warn_ignored(cfg, "optim.lr", "the optimizer is frozen"), "warns once"
    assert "optim.lr=0.5 is ignored: the optimizer is frozen" in caplog.text
