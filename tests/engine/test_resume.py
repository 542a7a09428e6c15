"""A killed run resumes from its last checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from driftprompt.engine import CheckpointError, hookimpl
from driftprompt.engine.checkpoint import FORMAT_VERSION, atomic_save, load, rng_state, set_rng_state

from ..conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]

CRASHER = textwrap.dedent('''
    """Kills its own process with SIGKILL when experience KILL_AT_EXPERIENCE starts."""
    import os, signal
    from driftprompt.engine import hookimpl

    class Crasher:
        @hookimpl
        def experience_start(self, state):
            if os.environ.get("KILL_AT_EXPERIENCE") == str(state.experience.index):
                os.kill(os.getpid(), signal.SIGKILL)

    @hookimpl
    def register_strategies(register):
        register("crasher", Crasher)
''')


def _launch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args, "-q"], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_killed_run_resumes_to_the_same_accuracy_matrix(tmp_path):
    crasher = tmp_path / "crasher.py"
    crasher.write_text(CRASHER)
    cfg = tiny_config(
        strategies=["finetune", "crasher"],
        plugin_modules=[str(crasher)],
        train={"epochs": 2, "batch_size": 4, "reset_optimizer": False, "optimizer": {"name": "adam", "lr": 0.01}},
    )
    cfg["stream"]["options"].update(num_classes=8, n_experiences=4)
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))

    full = _launch(str(path), "--run-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    killed = _launch(str(path), "--run-dir", str(tmp_path / "killed"), env={"KILL_AT_EXPERIENCE": "2"})
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "summary.json").exists()
    partial = load(tmp_path / "killed" / "checkpoint.pt")
    assert partial["next_experience"] == 2
    assert not list((tmp_path / "killed").glob(".checkpoint.pt.*")), "no temporary file is left behind"

    resumed = _launch("--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert b["accuracy"] == a["accuracy"]
    assert len(a["accuracy"]) == 4 and all(v is not None for v in a["accuracy"][3])
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("experience") == 4 and "resume" in kinds


def test_resume_refuses_another_config_or_a_missing_checkpoint(tmp_path):
    from driftprompt.engine.run import resume

    with pytest.raises(CheckpointError, match="not a run directory"):
        resume(tmp_path)
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(CheckpointError, match="No checkpoint"):
        resume(tmp_path)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    atomic_save({"format_version": FORMAT_VERSION, "value": 1}, target)

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        atomic_save({"format_version": FORMAT_VERSION, "value": 2}, target)
    monkeypatch.undo()
    assert load(target)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_damaged_checkpoint_is_reported(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load(bad)


def test_rng_state_round_trip():
    import random

    import numpy as np

    snap = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(snap)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


class GrowingPrompts:
    """Adds a parameter group at every experience (like component-wise prompt methods)."""

    def __init__(self) -> None:
        self.prompts = torch.nn.ParameterList()
        self.stop_after: int | None = None

    @hookimpl
    def experience_start(self, state):
        self.prompts.append(torch.nn.Parameter(torch.zeros(1, state.backbone.embed_dim, device=state.device)))

    @hookimpl
    def trainable_parameters(self, state):
        if state.phase == "train":
            return [{"params": [p], "name": f"grow{i}", "role": "prompt", "layer": 0} for i, p in enumerate(self.prompts)]

    @hookimpl
    def before_forward(self, state):
        state.prompts.add_tokens(sum(self.prompts))

    @hookimpl
    def experience_end(self, state):
        if self.stop_after == state.experience.index:
            state.stop = True

    def state_dict(self):
        return {"prompts": [p.detach() for p in self.prompts]}

    def load_state_dict(self, state):
        self.prompts = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in state["prompts"]])


def test_resume_with_a_kept_optimizer_and_growing_parameter_groups(tmp_path, make_config):
    from driftprompt.engine.run import build, resume

    from ..conftest import registry_with

    registry = registry_with(grow=GrowingPrompts)
    stream = {"name": "synthetic", "options": {"num_classes": 6, "n_experiences": 3, "train_per_class": 8, "test_per_class": 4, "image_size": 16}}
    cfg = make_config(strategies=["finetune", "grow"], stream=stream, train={"epochs": 2, "batch_size": 8, "reset_optimizer": False})
    with build(cfg, run_dir=tmp_path / "full", registry=registry) as run:
        full = run.fit()
    with build(cfg, run_dir=tmp_path / "cut", registry=registry) as run:
        dict(run.strategies)["grow"].stop_after = 0
        run.fit()
    with resume(tmp_path / "cut", registry=registry) as run:
        assert run.loop.start == 1
        resumed = run.fit()
    assert resumed["accuracy"] == full["accuracy"]
