"""A run either finishes right or stops with one sentence; results are never lost or mixed."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from driftprompt.engine import CheckpointError, ConfigError, PluginError, hookimpl
from driftprompt.engine.checkpoint import load
from driftprompt.engine.cli import main
from driftprompt.engine.config import load_config, validate
from driftprompt.engine.loggers import read_jsonl
from driftprompt.engine.run import build, resume

from ..conftest import Interrupt, registry_with, tiny_config
from .test_resume import GrowingPrompts

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --- the run directory ---------------------------------------------------------------------


def test_a_second_process_cannot_write_a_locked_run_directory(tmp_path, make_config):
    first = build(make_config(), run_dir=tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match="in use by another driftprompt process"):
            build(make_config(), run_dir=tmp_path / "run")
        with pytest.raises(ConfigError, match="in use"):
            resume(tmp_path / "run")
    finally:
        first.close()
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_a_non_empty_folder_that_is_not_a_run_is_refused_and_left_alone(tmp_path, make_config):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty .*notes.txt.* not a driftprompt run"):
        build(make_config(), run_dir=mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_a_run_directory_under_a_file_is_one_sentence(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cfg = _write(tmp_path / "c.yaml", tiny_config())
    assert main([str(cfg), "--run-dir", str(tmp_path / "file" / "run"), "-q"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "file" in line and "Not a directory" in line


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ""])
def test_a_run_name_is_a_plain_file_name(name):
    with pytest.raises(ConfigError, match="name"):
        validate(tiny_config(name=name))


def test_yaml_aliases_are_refused(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1024
    with pytest.raises(ConfigError, match="alias"):
        load_config(bomb)


def test_a_binary_config_is_one_sentence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


# --- resume: fingerprints, finished runs, duplicate records ----------------------------------


def test_resume_refuses_an_edited_config_but_allows_the_safe_keys(tmp_path, make_config):
    registry = registry_with(stop=Interrupt)
    cfg = make_config(strategies=["finetune", {"name": "stop", "at_step": 2}], log={"tensorboard": False, "progress": False, "jsonl": True})
    with pytest.raises(KeyboardInterrupt):
        with build(cfg, run_dir=tmp_path / "run", registry=registry) as run:
            run.fit()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"
    path = tmp_path / "run" / "config.yaml"
    original = yaml.safe_load(path.read_text())

    edited = json.loads(json.dumps(original))
    edited["train"]["epochs"] = 3
    edited["seed"] = 7
    path.write_text(yaml.safe_dump(edited))
    with pytest.raises(ConfigError, match=r"differs .*\(seed, train\.epochs\)"):
        resume(tmp_path / "run", registry=registry)

    safe = json.loads(json.dumps(original))
    safe["log"]["progress"] = True
    safe["eval"]["batch_size"] = 7
    safe["strategies"][1]["options"]["at_step"] = -1
    path.write_text(yaml.safe_dump(safe))
    with pytest.raises(ConfigError, match=r"strategies\.1\.options\.at_step"):
        resume(tmp_path / "run", registry=registry)
    safe["strategies"][1]["options"]["at_step"] = 2
    path.write_text(yaml.safe_dump(safe))
    with resume(tmp_path / "run", registry=registry) as run:
        dict(run.strategies)["stop"].at_step = -1  # the "kill" does not recur
        assert run.fit()["status"] == "finished"


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", tiny_config(log={"tensorboard": True, "progress": False}))
    assert main([str(cfg), "--run-dir", str(tmp_path / "run"), "-q"]) == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["--resume", str(tmp_path / "run"), "-q"]) == 0
    assert "already finished" in capsys.readouterr().out
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before


def test_kill_and_resume_leave_no_duplicate_records(tmp_path, make_config):
    registry = registry_with(stop=Interrupt)
    # 2 epochs x 2 batches per experience: the kill comes in experience 1's second epoch,
    # after its first epoch's "train" record was written
    cfg = make_config(strategies=["finetune", {"name": "stop", "at_step": 6}], log={"tensorboard": True, "progress": False}, train={"epochs": 2, "batch_size": 8})
    with pytest.raises(KeyboardInterrupt):
        with build(cfg, run_dir=tmp_path / "run", registry=registry) as run:
            run.fit()
    assert [r["experience"] for r in read_jsonl(tmp_path / "run", "train")] == [0, 0, 1]
    with resume(tmp_path / "run", registry=registry) as run:
        dict(run.strategies)["stop"].at_step = -1
        run.fit()
    records = read_jsonl(tmp_path / "run")
    keys = [(r["kind"], r["step"], r.get("experience"), r.get("epoch")) for r in records if r["kind"] != "resume"]
    assert len(keys) == len(set(keys)), "a record is counted twice"
    assert [(r["experience"], r["epoch"]) for r in records if r["kind"] == "train"] == [(0, 0), (0, 1), (1, 0), (1, 1)]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 4


# --- mid-experience checkpoints ------------------------------------------------------------


def test_every_steps_checkpoint_resumes_to_the_identical_result(tmp_path, make_config):
    registry = registry_with(grow=GrowingPrompts, stop=Interrupt)
    stream = {"name": "synthetic", "options": {"num_classes": 4, "n_experiences": 2, "train_per_class": 8, "test_per_class": 4, "image_size": 16, "seed": 0}}
    train = {"epochs": 2, "batch_size": 4, "reset_optimizer": False, "scheduler": "cosine", "optimizer": {"name": "adam", "lr": 0.01}}

    def config(at_step: int):
        return make_config(strategies=["finetune", "grow", {"name": "stop", "at_step": at_step}], stream=stream, train=train, checkpoint={"every_steps": 13})

    with build(config(-1), run_dir=tmp_path / "full", registry=registry) as run:
        full = run.fit()
        full_head = run.state.head.weight.detach().clone()
        full_prompts = [p.detach().clone() for p in dict(run.strategies)["grow"].prompts]
    # experience 1 runs steps 9..16 (4 batches x 2 epochs); the checkpoint at step 13 is in its
    # second epoch, and three steps follow it
    with pytest.raises(KeyboardInterrupt):
        with build(config(14), run_dir=tmp_path / "cut", registry=registry) as run:
            run.fit()
    payload = load(tmp_path / "cut" / "checkpoint.pt")
    assert payload["position"] == {**payload["position"], "epoch": 1, "batch": 1} and payload["step"] == 13 and payload["next_experience"] == 1
    with resume(tmp_path / "cut", registry=registry) as run:
        dict(run.strategies)["stop"].at_step = -1
        resumed = run.fit()
        torch.testing.assert_close(run.state.head.weight, full_head, rtol=0, atol=0)
        for mine, theirs in zip(dict(run.strategies)["grow"].prompts, full_prompts, strict=True):
            torch.testing.assert_close(mine.detach(), theirs, rtol=0, atol=0)
    assert resumed["accuracy"] == full["accuracy"]
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "finished"
    train_records = [(r["experience"], r["epoch"]) for r in read_jsonl(tmp_path / "cut", "train")]
    assert train_records == [(0, 0), (0, 1), (1, 0), (1, 1)]


# --- SIGTERM --------------------------------------------------------------------------------

TERMINATOR = textwrap.dedent('''
    import os, signal
    from driftprompt.engine import hookimpl

    class Terminator:
        @hookimpl
        def experience_start(self, state):
            if state.experience.index == 1 and os.environ.get("SEND_SIGTERM"):
                os.kill(os.getpid(), signal.SIGTERM)

    @hookimpl
    def register_strategies(register):
        register("terminator", Terminator)
''')


def test_sigterm_stops_with_the_resume_command_and_the_run_resumes(tmp_path):
    plugin = tmp_path / "terminator.py"
    plugin.write_text(TERMINATOR)
    cfg = _write(tmp_path / "c.yaml", tiny_config(strategies=["finetune", "terminator"], plugin_modules=[str(plugin)]))
    run_dir = tmp_path / "run"
    env = {**os.environ, "SEND_SIGTERM": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), str(cfg), "--run-dir", str(run_dir), "-q"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 143, done.stderr
    assert "Traceback" not in done.stderr and f"--resume {run_dir}" in done.stderr
    assert load(run_dir / "checkpoint.pt")["next_experience"] == 1
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert not list(run_dir.glob(".checkpoint.pt.*"))
    env.pop("SEND_SIGTERM")
    again = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--resume", str(run_dir), "-q"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


# --- failures are recorded and named -------------------------------------------------------


class Boom:
    @hookimpl
    def batch_end(self, state):
        if state.experience.index == 1:
            raise RuntimeError("boom\nsecond line")


def test_a_failure_after_the_directory_exists_marks_the_run_failed(tmp_path, make_config):
    with pytest.raises(PluginError, match="Strategy 'boom' failed while handling 'batch_end': RuntimeError: boom"):
        with build(make_config(strategies=["finetune", "boom"]), run_dir=tmp_path / "run", registry=registry_with(boom=Boom)) as run:
            run.fit()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "boom" in summary["error"] and "accuracy" not in summary
    assert "\n" not in summary["error"]


def test_a_plugin_crash_in_the_cli_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    plugin = tmp_path / "boomer.py"
    plugin.write_text(textwrap.dedent('''
        from driftprompt.engine import hookimpl

        class Boomer:
            @hookimpl
            def batch_start(self, state):
                raise ZeroDivisionError("no")

        @hookimpl
        def register_strategies(register):
            register("boomer", Boomer)
    '''))
    cfg = _write(tmp_path / "c.yaml", tiny_config(strategies=["finetune", "boomer"], plugin_modules=[str(plugin)]))
    assert main([str(cfg), "--run-dir", str(tmp_path / "a"), "-q"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "'boomer'" in line and "'batch_start'" in line and "ZeroDivisionError" in line
    assert main([str(cfg), "--run-dir", str(tmp_path / "b"), "-q", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("source, pattern", [("def broken(:\n", "syntax error at line 1"), ("import no_such_module_anywhere\n", "failed while importing at line 1 .*ModuleNotFoundError")])
def test_a_broken_plugin_module_is_one_sentence_before_any_file(tmp_path, capsys, source, pattern):
    plugin = tmp_path / "bad.py"
    plugin.write_text(source)
    cfg = _write(tmp_path / "c.yaml", tiny_config(plugin_modules=[str(plugin)]))
    assert main([str(cfg), "--run-dir", str(tmp_path / "run"), "-q"]) == 2
    import re

    assert re.search(pattern, _one_error_line(capsys.readouterr().err))
    assert not (tmp_path / "run").exists()


def test_a_misspelt_hook_creates_no_run_directory(tmp_path, make_config):
    class Typo:
        @hookimpl
        def experiance_start(self, state): ...

    with pytest.raises(PluginError, match="does not exist"):
        build(make_config(strategies=["typo"]), run_dir=tmp_path / "run", registry=registry_with(typo=Typo))
    assert not (tmp_path / "run").exists()


def test_a_full_disk_is_one_sentence_and_the_run_is_marked(tmp_path, capsys, monkeypatch):
    def no_space(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # write() names no file

    monkeypatch.setattr(torch, "save", no_space)
    cfg = _write(tmp_path / "c.yaml", tiny_config())
    assert main([str(cfg), "--run-dir", str(tmp_path / "run"), "-q"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "checkpoint.pt" in line
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"
    assert not list((tmp_path / "run").glob(".checkpoint.pt.*"))


def test_a_full_disk_while_logging_names_the_log(tmp_path, capsys, monkeypatch):
    from driftprompt.engine import loggers

    real, calls = loggers.RunLogger._sync, []

    def no_space(self):
        calls.append(1)
        if len(calls) == 2:  # the second record: fsync finds the disk full, and names no file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)

    monkeypatch.setattr(loggers.RunLogger, "_sync", no_space)
    cfg = _write(tmp_path / "c.yaml", tiny_config())
    assert main([str(cfg), "--run-dir", str(tmp_path / "run"), "-q"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "metrics.jsonl" in line and "No space left" in line and "--resume" in line


def test_a_read_only_output_directory_is_one_sentence(tmp_path, capsys, monkeypatch):
    import pathlib

    real = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if "readonly" in str(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    cfg = _write(tmp_path / "c.yaml", tiny_config())
    assert main([str(cfg), "--run-dir", str(tmp_path / "readonly" / "run"), "-q"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "Permission denied" in line and "readonly" in line


# --- options, conflicts, checkpoint contents --------------------------------------------------


def test_a_strategy_option_of_the_wrong_type_is_named_before_the_run(tmp_path):
    cfg = validate(tiny_config(strategies=[{"name": "l2p", "pool_size": 2.5, "prompt_length": 2, "top_k": 2}]))
    with pytest.raises(ConfigError, match="'l2p' option 'pool_size' expects int"):
        build(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # a whole number written as a float is the int it means
    build(validate(tiny_config(strategies=[{"name": "l2p", "pool_size": 4.0, "prompt_length": 2, "top_k": 2}])), run_dir=None).close()


def test_two_strategies_that_own_the_head_are_named(make_config):
    run = build(make_config(strategies=["finetune", {"name": "l2p", "pool_size": 4, "prompt_length": 2, "top_k": 2}]), run_dir=None)
    with pytest.raises(PluginError, match="'finetune' and 'l2p' both train the head"):
        run.fit()


def test_two_strategies_returning_the_same_loss_term_are_named(make_config):
    class CE:
        @hookimpl
        def loss_terms(self, state):
            return {"ce": state.logits.float().logsumexp(1).mean()}

    run = build(make_config(strategies=["finetune", "other"]), run_dir=None, registry=registry_with(other=CE))
    with pytest.raises(PluginError, match="'finetune' and 'other' both return the loss term 'ce'"):
        run.fit()


class Unsaveable:
    def state_dict(self):
        return {"counts": [np.int64(3)]}

    def load_state_dict(self, state): ...


def test_a_state_dict_that_weights_only_cannot_load_is_refused_when_saved(tmp_path, make_config):
    with pytest.raises(CheckpointError, match=r"Strategy 'keeper' put a numpy.int64 at 'strategies.keeper.counts.0'"):
        with build(make_config(strategies=["finetune", "keeper"]), run_dir=tmp_path / "run", registry=registry_with(keeper=Unsaveable)) as run:
            run.fit()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_a_checkpoint_missing_keys_is_one_sentence(tmp_path, make_config):
    with build(make_config(), run_dir=tmp_path / "run") as run:
        run.fit()
    payload = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    del payload["rng"], payload["config"]
    torch.save(payload, tmp_path / "run" / "checkpoint.pt")
    (tmp_path / "run" / "summary.json").unlink()
    with pytest.raises(CheckpointError, match="lacks 'rng', 'config'"):
        resume(tmp_path / "run")


# --- which loop a config belongs to -----------------------------------------------------------


def test_a_test_time_strategy_without_adapt_is_refused(tmp_path, capsys):
    cfg = tiny_config(strategies=[{"name": "vpt_tta", "prompt_length": 2}])
    path = _write(tmp_path / "c.yaml", cfg)
    assert main([str(path), "--run-dir", str(tmp_path / "run"), "-q"]) == 2
    assert "driftprompt adapt" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("strategy", [{"name": "vpt_tta", "prompt_length": 2}, "ncm"], ids=["vpt_tta", "ncm"])
def test_adapt_with_a_classifier_that_was_never_trained_is_refused(tmp_path, capsys, strategy):
    path = _write(tmp_path / "c.yaml", tiny_config(strategies=[strategy]))
    assert main(["adapt", str(path), "--run-dir", str(tmp_path / "run"), "-q"]) == 2
    assert "never trained" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_adapt_with_a_trained_head_runs(tmp_path, capsys, make_config):
    with build(make_config(), run_dir=tmp_path / "trained") as run:
        run.fit()
    cfg = tiny_config(strategies=[{"name": "vpt_tta", "prompt_length": 2}], test_time={"steps": 1, "batch_size": 1, "head_checkpoint": str(tmp_path / "trained" / "checkpoint.pt")})
    assert main(["adapt", str(_write(tmp_path / "c.yaml", cfg)), "--run-dir", str(tmp_path / "run"), "-q"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"


def test_a_test_time_stream_is_refused_by_the_continual_loop(make_config):
    from driftprompt.engine.run import check_mode

    class TestTimeLike:
        def batches(self, batch_size): ...

    with pytest.raises(ConfigError, match="test-time stream .*driftprompt adapt"):
        check_mode("fit", make_config(), [], None, TestTimeLike())


def test_an_unreadable_checkpoint_is_condensed_to_its_cause(tmp_path):
    import io

    buffer = io.BytesIO()
    torch.save({"x": np.int64(3)}, buffer)
    (tmp_path / "checkpoint.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError) as info:
        load(tmp_path / "checkpoint.pt")
    message = str(info.value)
    assert "\n" not in message and "Unsupported global" in message and "PyTorch 2.6" not in message


def test_evaluation_mode_a_strategy_cannot_score_is_refused_before_the_run_directory(tmp_path):
    from driftprompt.plugins.finetune import Finetune

    class SeenOnly(Finetune):
        eval_classes = ("seen",)

    cfg = tiny_config(strategies=["seen_only"])
    cfg["eval"]["classes"] = "all"
    with pytest.raises(ConfigError, match="seen_only.*eval.classes"):
        build(validate(cfg), tmp_path / "run", registry_with(seen_only=SeenOnly), mode="fit")
    assert not (tmp_path / "run").exists()
