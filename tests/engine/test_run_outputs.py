"""What a finished run leaves in its directory."""

from __future__ import annotations

import json

from driftprompt.engine.loggers import read_jsonl
from driftprompt.engine.run import build


def test_a_run_writes_jsonl_tensorboard_summary_and_checkpoint(tmp_path, make_config):
    config = make_config(log={"tensorboard": True, "progress": False}, eval={"batch_size": 64, "future": True})
    with build(config, run_dir=tmp_path / "run") as run:
        summary = run.fit()
    run_dir = tmp_path / "run"
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.jsonl", "tensorboard", "checkpoint.pt", "summary.json"}
    assert json.loads((run_dir / "summary.json").read_text())["accuracy"] == summary["accuracy"]
    # with future evaluation the whole matrix is filled and forward transfer is defined
    assert all(v is not None for row in summary["accuracy"] for v in row)
    assert summary["forward_transfer"] is not None and len(summary["baseline"]) == 2
    records = read_jsonl(run_dir / "metrics.jsonl")
    experiences = [r for r in records if r["kind"] == "experience"]
    assert [r["experience"] for r in experiences] == [0, 1]
    assert experiences[-1]["final_average_accuracy"] == summary["final_average_accuracy"]
    assert experiences[0]["train_images_per_s"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert "accuracy_matrix" in acc.Tags()["images"]
    assert "experience/final_average_accuracy" in acc.Tags()["scalars"]
