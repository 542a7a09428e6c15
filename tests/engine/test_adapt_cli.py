"""`driftprompt adapt`: test-time adaptation of a config's stream from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from driftprompt.engine.cli import main

from ..conftest import tiny_config

TINY_CLIP = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-clip.json")


def test_adapt_runs_tpt_on_a_clip_backbone_built_from_the_config(tmp_path, capsys):
    cfg = tiny_config(strategies=[{"name": "tpt", "views": 8}], test_time={"steps": 1, "batch_size": 1})
    cfg["backbone"] = {"kind": "clip", "name": "tiny-clip", "weights": "random", "clip_config": TINY_CLIP}
    cfg["stream"]["options"].update(num_classes=2, n_experiences=2, test_per_class=2)
    path = tmp_path / "adapt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["adapt", str(path), "--run-dir", str(tmp_path / "run"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "online accuracy:" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples"] == 4 and summary["strategies"] == ["tpt"]
    assert set(summary["per_domain"]) == {"experience 0", "experience 1"}


def test_a_deployed_head_is_loaded_from_a_checkpoint(tmp_path, make_config):
    import torch

    from driftprompt.engine.run import build

    with build(make_config(), run_dir=tmp_path / "trained") as run:
        run.fit()
        trained = run.state.head.weight.detach().clone()
    deployed = build(make_config(strategies=["ncm"], test_time={"head_checkpoint": str(tmp_path / "trained" / "checkpoint.pt")}), run_dir=None)
    torch.testing.assert_close(deployed.state.head.weight, trained)
