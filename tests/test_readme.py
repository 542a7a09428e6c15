"""The README's strategy example runs as printed, and its commands match the CI script."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(lang: str, first_line: str) -> str:
    for body in re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"README has no {lang} block starting with {first_line!r}")


def test_readme_strategy_example_runs_through_launch_py(tmp_path):
    (tmp_path / "my_strategy.py").write_text(_block("python", "# my_strategy.py"))
    command = next(line for line in _block("bash", "python launch.py configs/demo.yaml plugin_modules").splitlines() if line.strip())
    args = shlex.split(command)[2:]  # drop "python launch.py"
    args[0] = str(ROOT / args[0])
    # the same command, shrunk to test size
    shrink = ["train.epochs=1", "backbone.kwargs.depth=1", "stream.options.train_per_class=10", "stream.options.test_per_class=5", "log.tensorboard=false"]
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args, *shrink, "--run-dir", "run", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategies"] == ["head_anchor"] and len(summary["accuracy"]) == 5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" for r in records)


def test_ci_runs_the_readme_test_command():
    install_and_test = _block("bash", "python3 -m venv .venv && . .venv/bin/activate && pip install -e \".[test]\"").strip()
    ci = (ROOT / ".ci" / "run").read_text()
    for step in install_and_test.split(" && ")[2:]:
        assert step in ci, f".ci/run does not run the README step {step!r}"


def test_demo_config_file_matches_the_builtin_demo():
    from driftprompt.engine.cli import demo_config
    from driftprompt.engine.config import load_config, validate

    shipped = load_config(ROOT / "configs" / "demo.yaml").model_dump(exclude={"name"})
    builtin = validate(demo_config("finetune")).model_dump(exclude={"name"})
    assert shipped == builtin
