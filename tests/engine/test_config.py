"""Config validation, overrides and the one-sentence errors users see."""

from __future__ import annotations

import pytest
import yaml

from driftprompt.engine import ConfigError
from driftprompt.engine.cli import main
from driftprompt.engine.config import apply_override, load_config, validate
from driftprompt.engine.run import build

from ..conftest import tiny_config


def test_defaults_validate_and_strategy_shorthand_expands():
    cfg = validate({"strategies": ["ncm", {"name": "finetune", "mask_current": True}]})
    assert [(s.name, s.options) for s in cfg.strategies] == [("ncm", {}), ("finetune", {"mask_current": True})]
    assert cfg.train.optimizer.name == "adam"


def test_unknown_nested_key_names_the_key_and_the_allowed_keys():
    with pytest.raises(ConfigError) as info:
        validate({"train": {"epohcs": 3}})
    msg = str(info.value)
    assert msg.startswith("Unknown config key 'train.epohcs'; did you mean 'epochs'?")
    assert "batch_size" in msg and "grad_clip" in msg and msg.count(".") >= 1 and "\n" not in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"Unknown config key 'sed'; did you mean 'seed'\? allowed keys at the top level are: .*strategies"):
        validate({"sed": 1})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"train": {"epochs": "ten"}}, r"Config key 'train.epochs': input should be a valid integer.*'ten'"),
        ({"train": {"epochs": 0}}, r"Config key 'train.epochs': input should be greater than or equal to 1"),
        ({"train": {"optimizer": {"name": "adm"}}}, r"Config key 'train.optimizer.name': input should be 'adam', 'adamw' or 'sgd' \(got 'adm'\)"),
        ({"precision": "fp16"}, r"Config key 'precision': input should be 'auto', 'bf16' or 'fp32'"),
    ],
)
def test_wrong_types_and_values_name_key_and_allowed_values(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_overrides_parse_yaml_values_and_reach_nested_and_list_items(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"strategies": ["finetune"], "train": {"epochs": 1}}))
    cfg = load_config(path, ["train.epochs=3", "train.optimizer.lr=0.5", "strategies.0.mask_current=true", "backbone.kwargs.img_size=32", "eval.future=yes"])
    assert cfg.train.epochs == 3 and cfg.train.optimizer.lr == 0.5
    assert cfg.strategies[0].options == {"mask_current": True}
    assert cfg.backbone.kwargs == {"img_size": 32} and cfg.eval.future is True
    cfg = load_config(None, ["strategies=[ncm, finetune]"])
    assert [s.name for s in cfg.strategies] == ["ncm", "finetune"]


@pytest.mark.parametrize("override", ["train.epochs", "strategies.5.x=1", "seed.x=1"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError):
        apply_override({"seed": 0, "strategies": ["finetune"]}, override)


def test_cli_prints_one_sentence_without_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(train={"epochz": 2})))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Unknown config key 'train.epochz'") and "Traceback" not in err and len(err.splitlines()) == 1


def test_resolved_config_is_saved_in_the_run_dir(tmp_path, make_config):
    run = build(make_config(), run_dir=tmp_path / "run")
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.model_dump(exclude={"run_dir"}) == run.config.model_dump(exclude={"run_dir"})
    assert saved.run_dir == str(tmp_path / "run")
    run.close()


def test_a_run_dir_with_a_checkpoint_is_not_overwritten(tmp_path, make_config):
    with build(make_config(), run_dir=tmp_path / "run") as run:
        run.fit()
    with pytest.raises(ConfigError, match="already holds a checkpoint; continue it with --resume"):
        build(make_config(), run_dir=tmp_path / "run")


def test_every_shipped_config_validates_with_known_strategy_and_stream_options():
    from pathlib import Path

    from driftprompt.engine.plugins import check_options, discover

    registry = discover()
    paths = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        config = load_config(path)
        check_options(registry.stream(config.stream.name), config.stream.options, "stream")
        for spec in config.strategies:
            check_options(registry.strategy(spec.name), spec.options)


def test_cli_accepts_options_between_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(log={"tensorboard": False, "progress": False})))
    assert main([str(path), "-q", "train.epochs=1", "--run-dir", str(tmp_path / "run"), "strategies=[ncm]"]) == 0
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert [s.name for s in saved.strategies] == ["ncm"] and saved.train.epochs == 1
