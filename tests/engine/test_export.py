"""Export a finished run and serve it: the served model reproduces the run's evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from driftprompt.engine import CheckpointError, hookimpl
from driftprompt.engine.adapter import OnlineAdapter
from driftprompt.engine.cli import main
from driftprompt.engine.config import validate
from driftprompt.engine.export import export_run, load_export
from driftprompt.engine.run import build

from ..conftest import TINY_OPTIONS, registry_with, tiny_config

L2P = {"name": "l2p", **TINY_OPTIONS["l2p"]}


def _train(tmp_path: Path, strategy, name: str = "trained", registry=None, **changes) -> tuple[Path, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Train a tiny run; returns its directory and the (images, logits) of its final evaluation."""
    run_dir = tmp_path / name
    strategies = strategy if isinstance(strategy, list) else [strategy]
    with build(validate(tiny_config(strategies=strategies, **changes)), run_dir=run_dir, registry=registry) as run:
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        original = run.loop.eval_step

        def recording(images, targets, extras, allowed):
            logits = original(images, targets, extras, allowed)
            seen.append((images.clone(), logits.detach().clone()))
            return logits

        run.loop.eval_step = recording  # type: ignore[method-assign]
        run.fit()
        n = len(run.stream)
    return run_dir, seen[-n:]  # the evaluation after the last experience: one batch per experience


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-image forwards of a tiny ViT are far faster on one thread than on contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny finished run per strategy, trained once for the module, with its export."""
    runs: dict[str, tuple[Path, list[tuple[torch.Tensor, torch.Tensor]], Path]] = {}

    def get(kind: str) -> tuple[Path, list[tuple[torch.Tensor, torch.Tensor]], Path]:
        if kind not in runs:
            root = tmp_path_factory.mktemp(kind)
            # the finetune run evaluates a resized-and-cropped view, which serving must reproduce
            changes = {"eval": {"batch_size": 64, "resize": 20, "interpolation": "bilinear"}} if kind == "finetune" else {}
            run_dir, evaluated = _train(root, L2P if kind == "l2p" else kind, **changes)
            runs[kind] = (run_dir, evaluated, export_run(run_dir, root / "model.safetensors"))
        return runs[kind]

    return get


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


def _served(adapter: OnlineAdapter, images: torch.Tensor) -> torch.Tensor:
    rows = []
    for image in images:
        (p,) = adapter.predict([image])
        assert p.ok, p.error
        rows.append(adapter.state.logits.detach()[0].clone())
        torch.testing.assert_close(p.probs, rows[-1].float().softmax(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["finetune", "l2p"])
def test_the_export_serves_the_runs_evaluation_logits(trained, kind):
    run_dir, evaluated, out = trained(kind)
    adapter = OnlineAdapter.from_export(out)
    for images, logits in evaluated:
        served = _served(adapter, images)
        torch.testing.assert_close(served, logits, rtol=0, atol=1e-6)
        assert torch.equal(served.argmax(1), logits.argmax(1))
    # the run's directory serves the same model without a file in between
    direct = OnlineAdapter.from_run(run_dir)
    images, logits = evaluated[0]
    torch.testing.assert_close(_served(direct, images), logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "strategies",
    [[L2P, "pgp"], [{"name": "dualprompt", **TINY_OPTIONS["dualprompt"]}], [{"name": "coda_prompt", **TINY_OPTIONS["coda_prompt"]}], ["ncm"], [{"name": "vpt", **TINY_OPTIONS["vpt"]}]],
    ids=["l2p+pgp", "dualprompt", "coda_prompt", "ncm", "vpt"],
)
def test_every_continual_strategy_is_served_as_it_was_evaluated(tmp_path, strategies):
    run_dir, evaluated = _train(tmp_path, strategies)
    adapter = OnlineAdapter.from_export(export_run(run_dir, tmp_path / "model.safetensors"))
    for images, logits in evaluated:
        torch.testing.assert_close(_served(adapter, images), logits, rtol=0, atol=1e-6)


class EvalShift:
    """A trained classifier part that acts at evaluation only: a forward wrapper adding a
    learned-looking per-class offset (its saved state) to the logits when state.phase == "eval"."""

    def __init__(self) -> None:
        self.offset = torch.zeros(4)

    @hookimpl
    def experience_end(self, state) -> None:
        self.offset = torch.arange(4, dtype=torch.float32) * (state.experience.index + 1)

    @hookimpl(wrapper=True)
    def forward(self, state):
        logits = yield
        return logits + self.offset.to(logits.device) if state.phase == "eval" else logits

    def state_dict(self):
        return {"offset": self.offset, "note": ("kept", 1)}

    def load_state_dict(self, state) -> None:
        assert state["note"] == ("kept", 1)  # tuples come back as tuples
        self.offset = state["offset"]


def test_a_plugin_strategy_serves_with_its_evaluation_semantics(tmp_path):
    registry = registry_with(evalshift=EvalShift)
    run_dir, evaluated = _train(tmp_path, ["finetune", "evalshift"], registry=registry)
    out = export_run(run_dir, tmp_path / "model.safetensors", registry=registry)
    adapter = OnlineAdapter.from_export(out, registry=registry)
    assert [n for n, _ in adapter.strategies] == ["evalshift"]  # finetune has no inference hook
    assert torch.equal(adapter.strategies[0][1].inner.offset, torch.arange(4.0) * 2)
    for images, logits in evaluated:
        torch.testing.assert_close(_served(adapter, images), logits, rtol=0, atol=1e-6)


def test_l2p_is_served_with_its_trained_prompts_and_key_matching(trained):
    run_dir, evaluated, out = trained("l2p")
    export = load_export(out)
    state = export.states["l2p"]
    assert state["params"]["prompts"].shape == (4, 2, 32) and state["extra"]["counts"].sum() > 0
    adapter = OnlineAdapter.from_export(out)
    (_, l2p), = [(n, p) for n, p in adapter.strategies if n == "l2p"]
    torch.testing.assert_close(l2p.inner.params["prompt_keys"].detach(), state["params"]["prompt_keys"])
    assert not l2p.inner.params["prompts"].requires_grad  # a deployed strategy is never trained
    images, logits = evaluated[-1]
    # the prompts matter: a fresh (untrained) pool gives other logits
    fresh = OnlineAdapter.from_export(out)
    with torch.no_grad():
        fresh.strategies[0][1].inner.params["prompts"].uniform_(-1, 1)
    assert not torch.allclose(_served(fresh, images), logits, atol=1e-4)
    torch.testing.assert_close(_served(adapter, images), logits, rtol=0, atol=1e-6)


def test_the_file_is_plain_safetensors_with_string_metadata(trained):
    from safetensors import safe_open

    _, _, out = trained("l2p")
    raw = out.read_bytes()
    assert b"\x80\x04" not in raw[:16] and not raw.startswith(b"PK")  # neither a pickle nor a torch zip
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    assert {"head.weight", "head.bias", "strategies.l2p.params.prompts", "strategies.l2p.params.prompt_keys"} <= keys
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["format"] == "driftprompt-export" and meta["format_version"] == "1"
    backbone = json.loads(meta["backbone"])
    assert backbone["fingerprint"]["name"] == "vit_small_patch16_224" and backbone["seed"] == 0 and len(backbone["weights_sha256"]) == 64
    assert json.loads(meta["class_names"]) == [f"class {i}" for i in range(4)]  # the synthetic stream names none
    pre = json.loads(meta["preprocessing"])
    assert pre["image_size"] == [16, 16] and len(pre["mean"]) == 3
    assert [s["name"] for s in json.loads(meta["strategies"])] == ["l2p"]
    assert json.loads(meta["config"])["strategies"][0]["options"]["pool_size"] == 4
    run = json.loads(meta["run"])
    assert run["experiences"] == 2 and 0 <= run["final_average_accuracy"] <= 100


@pytest.mark.parametrize(("status", "fix"), [("failed", "train it again"), ("interrupted", "--resume"), ("missing", "--resume")])
def test_a_run_that_did_not_finish_is_refused(trained, tmp_path, status, fix):
    run_dir = _copy(trained("finetune")[0], tmp_path)
    if status == "missing":
        (run_dir / "summary.json").unlink()
    else:
        (run_dir / "summary.json").write_text(json.dumps({"status": status, "error": "boom"}))
    with pytest.raises(CheckpointError) as info:
        export_run(run_dir, tmp_path / "model.safetensors")
    message = str(info.value)
    assert "\n" not in message and fix in message and (f"status '{status}' (boom)" in message or "no summary.json" in message)
    assert not (tmp_path / "model.safetensors").exists()


def test_an_unfinished_checkpoint_and_a_folder_that_is_no_run_are_refused(trained, tmp_path):
    from driftprompt.engine.checkpoint import atomic_save, load

    run_dir = _copy(trained("finetune")[0], tmp_path)
    payload = load(run_dir / "checkpoint.pt")
    payload["next_experience"] = 1
    atomic_save(payload, run_dir / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="trained 1 of its 2 experiences"):
        export_run(run_dir, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a run directory"):
        export_run(tmp_path / "nowhere", tmp_path / "model.safetensors")
    (run_dir / "checkpoint.pt").unlink()  # what a finished test-time run leaves
    with pytest.raises(CheckpointError, match="without a checkpoint.pt"):
        export_run(run_dir, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


def test_another_backbone_is_refused(trained, tmp_path):
    from driftprompt.engine.backbones import ViTBackbone

    _, _, out = trained("finetune")
    kwargs = tiny_config()["backbone"]["kwargs"]
    torch.manual_seed(123)  # the same architecture with other weights
    other = ViTBackbone("vit_small_patch16_224", "random", **kwargs)
    with pytest.raises(CheckpointError, match="weights of backbone .* differ") as info:
        OnlineAdapter.from_export(out, backbone=other)
    assert "\n" not in str(info.value)
    deeper = ViTBackbone("vit_small_patch16_224", "random", **{**kwargs, "depth": 3})
    with pytest.raises(CheckpointError, match="not the one"):
        OnlineAdapter.from_export(out, backbone=deeper)
    # a weights file that is not the trained one, given as the source of the weights
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="differ"):
        OnlineAdapter.from_export(out, weights=tmp_path / "other.safetensors")


def test_other_files_are_refused_with_one_sentence(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a driftprompt export"):
        load_export(tmp_path / "plain.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_export(tmp_path / "text.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "future.safetensors"), metadata={"format": "driftprompt-export", "format_version": "99"})
    with pytest.raises(CheckpointError, match="version 99"):
        load_export(tmp_path / "future.safetensors")


def test_a_test_time_strategy_adapts_on_top_of_the_served_model(trained):
    from driftprompt.plugins.vpt_tta import VPTTTA

    _, evaluated, out = trained("l2p")
    adapter = OnlineAdapter.from_export(out, [VPTTTA(prompt_length=2, episodic=False, margin=10.0)], steps=1)
    l2p = adapter.strategies[0][1].inner
    before = {k: v.detach().clone() for k, v in l2p.params.items()}
    images, logits = evaluated[0]
    results = adapter.predict(list(images))
    assert all(r.ok for r in results)
    for k, v in l2p.params.items():
        assert torch.equal(v, before[k]), k  # the trained prompts stay as trained
    assert not torch.equal(adapter.strategies[1][1].prompt, adapter.strategies[1][1].init_prompt)  # the test-time prompt moved


def test_adapt_runs_with_the_export_as_its_classifier(trained, tmp_path, capsys):
    _, _, out = trained("l2p")
    cfg = tiny_config(strategies=[{"name": "vpt_tta", "prompt_length": 2}], test_time={"steps": 1, "batch_size": 1, "head_checkpoint": str(out)})
    path = tmp_path / "adapt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["adapt", str(path), "--run-dir", str(tmp_path / "served"), "-q"]) == 0
    summary = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["samples"] == 16
    assert summary["strategies"] == ["l2p", "vpt_tta"]  # the exported prompt strategy classifies


def test_adapt_with_zero_steps_scores_the_export_as_the_run_evaluated_it(trained):
    _, evaluated, out = trained("l2p")
    cfg = validate(tiny_config(strategies=[], test_time={"steps": 0, "head_checkpoint": str(out)}))
    with build(cfg, run_dir=None, mode="adapt") as served:
        result = served.adapt_stream()
    hits = sum(int((logits.argmax(1) == targets).sum()) for (_, logits), targets in zip(evaluated, _targets()))
    assert result["samples"] == 16
    assert result["online_accuracy"] == pytest.approx(100.0 * hits / 16)


def _targets() -> list[torch.Tensor]:
    from driftprompt.engine.plugins import discover
    from driftprompt.engine.run import build_stream
    from driftprompt.streams.base import iterate

    stream = build_stream(validate(tiny_config()), discover())
    return [next(iter(iterate(exp.test, 64)))[1] for exp in stream]


def test_adapt_refuses_an_export_of_another_backbone_or_a_strategy_listed_twice(trained, tmp_path, capsys):
    _, _, out = trained("l2p")
    cfg = tiny_config(strategies=[{"name": "vpt_tta", "prompt_length": 2}], seed=5, test_time={"head_checkpoint": str(out)})
    path = tmp_path / "adapt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["adapt", str(path), "--run-dir", str(tmp_path / "a"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "differ" in err
    cfg = tiny_config(strategies=[L2P, {"name": "vpt_tta", "prompt_length": 2}], test_time={"head_checkpoint": str(out)})
    path.write_text(yaml.safe_dump(cfg))
    assert main(["adapt", str(path), "--run-dir", str(tmp_path / "b"), "-q"]) == 2
    assert "already part of the exported classifier" in capsys.readouterr().err


def test_the_export_command_writes_the_file_and_refuses_an_unfinished_run_in_one_line(trained, tmp_path, capsys):
    run_dir = _copy(trained("finetune")[0], tmp_path)
    out = tmp_path / "cli.safetensors"
    assert main(["export", str(run_dir), "--out", str(out), "-q"]) == 0
    assert load_export(out).class_names == [f"class {i}" for i in range(4)]
    (run_dir / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "again.safetensors"), "-q"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "status 'interrupted'" in err[0]
    assert not (tmp_path / "again.safetensors").exists()
