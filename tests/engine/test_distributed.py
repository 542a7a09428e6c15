"""torchrun with the gloo backend on two CPU processes: same results, one writer, no hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from driftprompt.engine import ConfigError
from driftprompt.engine.run import build

from ..conftest import TINY_OPTIONS, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(tmp_path: Path, cfg: dict, run_dir: Path, nproc: int = 2, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "launch.py"), str(path), "--run-dir", str(run_dir), "-q"]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "launch.py"), str(path), "--run-dir", str(run_dir), "-q"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment, cwd=tmp_path)


def _config(strategies: list) -> dict:
    cfg = tiny_config(strategies=strategies, train={"epochs": 2, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}, "grad_clip": 1.0})
    cfg["distributed"] = {"timeout_s": 60}
    return cfg


@pytest.mark.parametrize("strategies", [["finetune"], ["ncm"], ["l2p"], ["l2p", "pgp"]], ids="+".join)
def test_two_processes_reach_the_single_process_accuracy_matrix(tmp_path, strategies):
    cfg = _config([{"name": name, **TINY_OPTIONS.get(name, {})} for name in strategies])
    one = _torchrun(tmp_path, cfg, tmp_path / "one", nproc=1)
    assert one.returncode == 0, one.stderr
    two = _torchrun(tmp_path, cfg, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "summary.json").read_text())["accuracy"]
    b = json.loads((tmp_path / "two" / "summary.json").read_text())["accuracy"]
    # same global batches, gradients averaged by share: equal up to float summation order
    assert [[pytest.approx(v, abs=1e-6) if v is not None else None for v in row] for row in a] == b
    # exactly one writer: one checkpoint, one log, one config, one summary, no second run dir
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == ["checkpoint.pt", "config.yaml", "metrics.jsonl", "summary.json", "tensorboard"] or files == ["checkpoint.pt", "config.yaml", "metrics.jsonl", "summary.json"]
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("experience") == 2
    assert not (tmp_path / "runs").exists()


KILLER = textwrap.dedent('''
    import os, signal
    from driftprompt.engine import hookimpl

    class KillRankOne:
        @hookimpl
        def experience_start(self, state):
            if state.experience.index == 1 and state.dist.rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    @hookimpl
    def register_strategies(register):
        register("kill_rank_one", KillRankOne)
''')


def test_a_killed_process_ends_the_job_instead_of_hanging(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    cfg = _config(["finetune", "kill_rank_one"])
    cfg["plugin_modules"] = [str(tmp_path / "killer.py")]
    proc = _torchrun(tmp_path, cfg, tmp_path / "killed", timeout=180)  # a hang would hit the timeout
    assert proc.returncode != 0
    # rank 0 names the failure in one sentence, unless torchrun's SIGTERM reaches it first
    assert "lost contact with the other processes" in proc.stderr or "ChildFailedError" in proc.stderr
    # the first experience finished and was checkpointed by rank 0
    assert (tmp_path / "killed" / "checkpoint.pt").exists()


def test_world_size_that_does_not_divide_the_batch(monkeypatch, make_config):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"train.batch_size \(8\) is not divisible by the 3 processes"):
        build(make_config(), run_dir=None)


def test_missing_rendezvous_variable_is_named(monkeypatch, make_config):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="rendezvous variable RANK is not set; start the job with torchrun"):
        build(make_config(), run_dir=None)
