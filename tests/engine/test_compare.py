"""`driftprompt compare`, `--seeds`, runtime.threads and the optimizer record."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml

from driftprompt.engine.cli import main
from driftprompt.engine.compare import compare, format_table

from ..conftest import tiny_config


def fake_run(root: Path, name: str, strategies: list[str], seed: int, final: float, *, status: str = "finished", stream_seed: int = 0, n_experiences: int = 3, epochs: int = 1) -> Path:
    """A run directory written by hand: config.yaml and summary.json as a run leaves them."""
    path = root / name
    path.mkdir(parents=True)
    config = {
        "name": "demo",
        "seed": seed,
        "run_dir": str(path),
        "device": "cpu",
        "stream": {"name": "synthetic", "options": {"num_classes": 6, "n_experiences": n_experiences, "seed": stream_seed}},
        "train": {"epochs": epochs},
        "strategies": [{"name": s, "options": {}} for s in strategies],
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    matrix = [[final + 10 * (n_experiences - 1 - i) if j <= i else None for j in range(n_experiences)] for i in range(n_experiences)]
    summary = {
        "status": status,
        "name": "demo",
        "strategies": strategies,
        "accuracy": matrix,
        "final_average_accuracy": final,
        "average_incremental_accuracy": final + 5,
        "forgetting": 100 - final,
        "backward_transfer": -(100 - final),
        "forward_transfer": None,
        "timings": [{"experience": i, "train_seconds": 1.0, "eval_seconds": 0.5} for i in range(n_experiences)],
    }
    if status != "finished":
        summary = {"status": status, "name": "demo", "strategies": strategies, "error": "Something broke; fix it."}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def three_runs(tmp_path):
    return [
        fake_run(tmp_path, "ft-0", ["finetune"], 0, 60.0),
        fake_run(tmp_path, "ft-1", ["finetune"], 1, 70.0),
        fake_run(tmp_path, "ncm-0", ["ncm"], 0, 80.0),
    ]


def test_runs_of_one_config_over_seeds_form_one_group_with_mean_and_std(three_runs, capsys, tmp_path):
    assert main(["compare", *map(str, three_runs), "--csv", str(tmp_path / "table.csv")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("finetune", "ncm"))}
    assert set(rows) == {"finetune", "ncm"}
    std = statistics.stdev([60.0, 70.0])
    assert f"65.00 +- {std:.2f}" in rows["finetune"]  # final accuracy over seeds 0 and 1
    assert "0,1" in rows["finetune"] and "80.00" in rows["ncm"] and "+-" not in rows["ncm"].split("80.00")[1].split()[0]
    assert "4.50" in rows["ncm"]  # time: 3 experiences x (1.0 + 0.5) s
    with open(tmp_path / "table.csv") as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    assert table["finetune"]["runs"] == "2" and table["finetune"]["seeds"] == "0 1"
    assert float(table["finetune"]["final_accuracy_mean"]) == pytest.approx(65.0)
    assert float(table["finetune"]["final_accuracy_std"]) == pytest.approx(std, abs=1e-5)
    assert table["ncm"]["final_accuracy_std"] == "" and table["finetune"]["forward_transfer_mean"] == ""


def test_a_folder_of_seed_runs_stands_for_them_and_twins_are_labelled_by_their_difference(tmp_path):
    fake_run(tmp_path / "a", "seed-0", ["finetune"], 0, 50.0)
    fake_run(tmp_path / "a", "seed-1", ["finetune"], 1, 52.0)
    fake_run(tmp_path, "longer", ["finetune"], 0, 58.0, epochs=3)
    comparison = compare([tmp_path / "a", tmp_path / "longer"])
    assert [len(g.runs) for g in comparison.groups] == [2, 1]
    labels = [g.label for g in comparison.groups]
    assert labels[0] != labels[1] and "train.epochs=3" in labels[1]


def test_the_stream_seed_does_not_split_a_group(tmp_path):
    runs = [fake_run(tmp_path, f"r{s}", ["finetune"], s, 60.0 + s, stream_seed=s) for s in (0, 1)]
    assert len(compare(runs).groups) == 1


def test_the_plot_is_a_png(three_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    assert main(["compare", *map(str, three_runs), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_that_is_not_a_run_is_one_sentence_naming_it(three_runs, tmp_path, capsys):
    stray = tmp_path / "notes"
    stray.mkdir()
    (stray / "readme.txt").write_text("not a run")
    assert main(["compare", str(three_runs[0]), str(stray)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert str(stray) in err and "not a run directory" in err


def test_runs_of_different_streams_are_refused_naming_the_run(three_runs, tmp_path, capsys):
    other = fake_run(tmp_path, "other-stream", ["finetune"], 0, 40.0, n_experiences=2)
    assert main(["compare", *map(str, three_runs), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(other) in err and "stream" in err


def test_a_failed_run_is_listed_as_left_out_and_not_averaged(three_runs, tmp_path, capsys):
    failed = fake_run(tmp_path, "ft-2", ["finetune"], 2, 0.0, status="failed")
    assert main(["compare", *map(str, three_runs), str(failed)]) == 0
    out = capsys.readouterr().out
    assert f"left out: {failed}: failed" in out
    assert "65.00 +- 7.07" in out  # still the mean of the two finished finetune runs
    assert main(["compare", str(failed)]) == 2
    assert "has finished" in capsys.readouterr().err


def test_compare_options_belong_to_compare(capsys):
    assert main(["plugins", "--csv", "x.csv"]) == 2
    assert "--csv belongs to compare" in capsys.readouterr().err


def write_tiny(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(**changes)))
    return path


def test_seeds_run_one_config_into_sibling_directories(tmp_path, capsys):
    config = write_tiny(tmp_path)
    base = tmp_path / "sweep"
    assert main([str(config), "--seeds", "0,1", "--run-dir", str(base), "-q"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in base.iterdir()) == ["seed-0", "seed-1"]
    configs = [yaml.safe_load((base / f"seed-{s}" / "config.yaml").read_text()) for s in (0, 1)]
    assert [c["seed"] for c in configs] == [0, 1]
    assert configs[0]["stream"]["options"]["seed"] == configs[1]["stream"]["options"]["seed"] == 0  # the stream is kept
    assert all(json.loads((base / f"seed-{s}" / "summary.json").read_text())["status"] == "finished" for s in (0, 1))
    assert "0,1" in out and "finetune" in out  # the comparison of the two seeds closes the output


def test_seeds_refuse_a_seed_override_and_bad_lists(tmp_path, capsys):
    config = write_tiny(tmp_path)
    assert main([str(config), "seed=3", "--seeds", "0,1", "--run-dir", str(tmp_path / "x")]) == 2
    assert "conflicts with --seeds" in capsys.readouterr().err
    assert main([str(config), "--seeds", "0,zero"]) == 2
    assert "not a list of integers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_runtime_threads_is_applied(tmp_path):
    import torch

    before = torch.get_num_threads()
    config = write_tiny(tmp_path, runtime={"threads": 1}, strategies=["ncm"])
    try:
        torch.set_num_threads(2)
        assert main([str(config), "--run-dir", str(tmp_path / "run"), "-q"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_effective_learning_rate_of_each_group_is_recorded(tmp_path, caplog):
    from driftprompt.engine.config import validate
    from driftprompt.engine.run import build

    config = validate(tiny_config(strategies=[{"name": "l2p", "pool_size": 4, "prompt_length": 2, "top_k": 2}]))
    with caplog.at_level("INFO", logger="driftprompt.engine.optim"), build(config, run_dir=tmp_path / "run") as run:
        run.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    optimizer = [r for r in records if r["kind"] == "optimizer"]
    assert [r["experience"] for r in optimizer] == [0, 1]
    groups = {g["name"]: g for g in optimizer[0]["groups"]}
    assert groups["l2p.prompts"]["lr"] == pytest.approx(0.03 * 8 / 256)  # l2p's batch-scaled rate, not train.optimizer.lr
    assert groups["l2p.prompts"]["set_by"] == "strategy l2p" and groups["head"]["role"] == "head"
    assert optimizer[0]["configured_lr"] == pytest.approx(0.01)
    lines = [m for m in caplog.messages if "parameter group 'l2p.prompts'" in m]
    assert len(lines) == 2 and "set by strategy l2p" in lines[0]


def test_a_group_at_the_configured_rate_says_so(tmp_path):
    from driftprompt.engine.config import validate
    from driftprompt.engine.run import build

    with build(validate(tiny_config()), run_dir=tmp_path / "run") as run:
        run.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    group = next(r for r in records if r["kind"] == "optimizer")["groups"][0]
    assert group["set_by"] == "train.optimizer.lr" and group["lr"] == pytest.approx(0.01)
