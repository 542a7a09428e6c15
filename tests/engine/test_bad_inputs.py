"""A table of bad inputs run through the command line, as a new user would meet them.

Each row builds its inputs in a fresh working directory, runs ``python -m
driftprompt.engine.cli`` there, and checks that the run stops loud and clean: a nonzero exit,
no Python traceback, a last stderr line ``error: ...`` that names the problem (a keyword per
row), and no new file except a failed-run marker (a run directory whose ``summary.json`` says
``"status": "failed"``). The rows run two at a time; most fail while the config is validated.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.conftest import TINY_BACKBONE, tiny_config

TIMEOUT_S = 120

# the suite's tiny config, with fewer images: most rows stop before training anyway
BASE: dict[str, Any] = tiny_config(name="bad", train={"epochs": 1, "batch_size": 4, "optimizer": {"name": "adam", "lr": 0.01}}, eval={"batch_size": 16})
BASE["stream"]["options"].update(train_per_class=4, test_per_class=2)


def config(**changes: Any) -> dict[str, Any]:
    """BASE with dotted-key changes (``{"train.epochs": 0}``); a value of ``...`` deletes the key."""
    cfg = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return cfg


def write(tmp: Path, data: Any, name: str = "cfg.yaml") -> str:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return name


def with_config(**changes: Any) -> Callable[[Path], list[str]]:
    return lambda tmp: [write(tmp, config(**changes))]


# --- setups that need files ------------------------------------------------------------------


def _state_dict(tmp: Path, **kwargs: Any) -> dict[str, Any]:
    import timm

    model = timm.create_model(TINY_BACKBONE["name"], pretrained=False, num_classes=0, **{**TINY_BACKBONE["kwargs"], **kwargs})
    return model.state_dict()


def weights_file(kind: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        import torch

        path = tmp / "w.pth"
        if kind == "text":
            path.write_text("this is a README, not weights\n")
        elif kind == "non_tensors":
            torch.save({"pos_embed": 1.5, "cls_token": "x"}, path)
        elif kind == "not_a_dict":
            torch.save([torch.zeros(2)], path)
        elif kind == "shapes":
            torch.save(_state_dict(tmp, embed_dim=64), path)
        elif kind == "truncated":
            torch.save(_state_dict(tmp), path)
            path.write_bytes(path.read_bytes()[:1000])
        return [write(tmp, config(backbone__weights=str(path)))]

    return setup


def _png(path: Path, value: int = 100, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path)


def _folder(root: Path, per_class: int = 2) -> Path:
    for split in ("train", "test"):
        for c in range(2):
            for k in range(per_class):
                _png(root / split / f"c{c}" / f"{k}.png", 60 * c + 20 * k)
    return root


def folder_stream(root: Path, **options: Any) -> dict[str, Any]:
    return {"name": "image_folder", "options": {"path": str(root), "image_size": 16, "n_experiences": 1, **options}}


def stream_setup(kind: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        if kind == "missing_root":
            stream = folder_stream(tmp / "no_such_images")
        elif kind == "empty_folder":
            (tmp / "empty_images").mkdir()
            stream = folder_stream(tmp / "empty_images")
        elif kind == "not_a_tar":
            (tmp / "data.tar").write_text("plain text, not an archive\n" * 20)
            stream = {"name": "image_tar", "options": {"path": str(tmp / "data.tar"), "n_experiences": 1}}
        elif kind == "all_corrupt":
            for split in ("train", "test"):
                for c in ("a", "b"):
                    (tmp / "junk" / split / c).mkdir(parents=True)
                    (tmp / "junk" / split / c / "0.png").write_bytes(b"")
                    (tmp / "junk" / split / c / "1.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
            stream = folder_stream(tmp / "junk")
        elif kind == "truncated_cache":
            from driftprompt.streams.folders import _cache_key

            root = _folder(tmp / "imgs")
            options = {"splits": ["train", "test"], "per_class": None, "image_size": 16, "kind": "folder"}
            cache = tmp / "cache"
            cache.mkdir()
            (cache / f"imgs-{_cache_key(root, **options)}.pt").write_bytes(b"PK\x03\x04 truncated zip")
            stream = folder_stream(root, cache_dir=str(cache), in_memory=True)
        else:
            raise AssertionError(kind)
        return [write(tmp, config(stream=stream))]

    return setup


def run_dir_setup(kind: str) -> Callable[[Path], Any]:
    def setup(tmp: Path) -> Any:
        cfg = write(tmp, config())
        if kind == "read_only":
            if os.geteuid() == 0:  # root writes through permission bits: use a read-only file system
                return [cfg, "--run-dir", "/proc/driftprompt-run"]
            (tmp / "ro").mkdir()
            (tmp / "ro").chmod(0o555)
            return [cfg, "--run-dir", str(tmp / "ro" / "run")]
        if kind == "under_file":
            (tmp / "notes.txt").write_text("a file, not a folder\n")
            return [cfg, "--run-dir", "notes.txt/run"]
        if kind == "foreign":
            (tmp / "thesis").mkdir()
            (tmp / "thesis" / "chapter1.tex").write_text("precious\n")
            return [cfg, "--run-dir", "thesis"]
        if kind == "locked":
            import fcntl

            (tmp / "busy").mkdir()
            handle = open(tmp / "busy" / ".driftprompt.lock", "w")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return [cfg, "--run-dir", "busy"], handle.close
        raise AssertionError(kind)

    return setup


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real, finished tiny run directory that resume rows copy and damage."""
    from driftprompt.engine.config import validate
    from driftprompt.engine.run import build

    path = tmp_path_factory.mktemp("finished") / "run"
    with build(validate(config()), run_dir=path) as run:
        run.fit()
    return path


def resume_setup(kind: str) -> Callable[[Path, Path], list[str]]:
    def setup(tmp: Path, finished: Path) -> list[str]:
        import shutil

        import torch

        if kind == "missing":
            return ["--resume", "gone_run"]
        if kind == "not_a_run":
            (tmp / "holiday").mkdir()
            (tmp / "holiday" / "photo.txt").write_text("x")
            return ["--resume", "holiday"]
        run = tmp / "run"
        shutil.copytree(finished, run)
        ckpt = run / "checkpoint.pt"
        payload = torch.load(ckpt, map_location="cpu", weights_only=True)
        payload["next_experience"] = 1  # one experience left to train
        if kind == "damaged":
            ckpt.write_bytes(b"PK\x03\x04" + os.urandom(64))
        elif kind == "missing_keys":
            torch.save({"format_version": payload.get("format_version"), "head": payload.get("head")}, ckpt)
        elif kind == "edited_config":
            torch.save(payload, ckpt)
            saved = yaml.safe_load((run / "config.yaml").read_text())
            saved["backbone"]["kwargs"]["depth"] = 1
            (run / "config.yaml").write_text(yaml.safe_dump(saved))
        else:
            raise AssertionError(kind)
        return ["--resume", "run"]

    return setup


def plugin_setup(kind: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        if kind == "syntax":
            (tmp / "myplug.py").write_text("def register_strategies(register)\n    pass\n")
        elif kind == "import_fails":
            (tmp / "myplug.py").write_text("import numpy\nraise RuntimeError('the lab server is down')\n")
        elif kind == "missing":
            pass
        elif kind == "nan_loss":
            (tmp / "myplug.py").write_text(
                "import torch\n"
                "from driftprompt.engine import hookimpl\n"
                "from driftprompt.engine.loop import cross_entropy\n\n"
                "class NaNLoss:\n"
                '    """A head trained on a loss that turns NaN."""\n\n'
                "    @hookimpl\n"
                "    def trainable_parameters(self, state):\n"
                "        if state.phase == 'train' and state.head is not None:\n"
                "            return [{'params': list(state.head.parameters()), 'name': 'head', 'role': 'head'}]\n\n"
                "    @hookimpl\n"
                "    def loss_terms(self, state):\n"
                "        return {'nan_ce': cross_entropy(state) * float('nan')}\n\n"
                "@hookimpl\n"
                "def register_strategies(register):\n"
                "    register('nanloss', NaNLoss)\n"
            )
            return [write(tmp, config(plugin_modules=[str(tmp / "myplug.py")], strategies=["nanloss"]))]
        return [write(tmp, config(plugin_modules=[str(tmp / "myplug.py")]))]

    return setup


def adapt_setup(kind: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        if kind == "test_time_without_adapt":
            return [write(tmp, config(strategies=[{"name": "vpt_tta"}], test_time={"steps": 1}))]
        if kind == "adapt_without_head":
            return ["adapt", write(tmp, config(strategies=[{"name": "vpt_tta"}], test_time={"steps": 1}))]
        raise AssertionError(kind)

    return setup


# --- the table -------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    keyword: str
    setup: Callable[..., Any]


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nname: *c\n"

ROWS = [
    # config files
    Row("config_missing", "nope.yaml", lambda tmp: ["nope.yaml"]),
    Row("config_binary", "cfg.yaml", lambda tmp: [(tmp / "cfg.yaml").write_bytes(bytes(range(256)) * 4) and "cfg.yaml"]),
    Row("config_not_a_mapping", "mapping", lambda tmp: [write(tmp, "- finetune\n- ncm\n")]),
    Row("config_invalid_yaml", "yaml", lambda tmp: [write(tmp, "train: {epochs: 3\nstrategies: [finetune\n")]),
    Row("config_scalar", "mapping", lambda tmp: [write(tmp, "42\n")]),
    Row("unknown_top_key", "epochz", with_config(epochz=3)),
    Row("unknown_train_key", "epochz", with_config(train__epochz=3)),
    Row("unknown_backbone_key", "nme", with_config(backbone__nme="vit_small_patch16_224")),
    Row("unknown_optimizer_key", "lrr", with_config(train__optimizer__lrr=0.1)),
    Row("unknown_log_key", "tensorbord", with_config(log__tensorbord=True)),
    Row("unknown_stream_key", "option", with_config(stream__option={})),
    Row("wrong_type_epochs", "epochs", with_config(train__epochs="three")),
    Row("wrong_type_strategies", "strategies", with_config(strategies={"finetune": True})),
    Row("negative_batch_size", "batch_size", with_config(train__batch_size=-4)),
    Row("zero_epochs", "epochs", with_config(train__epochs=0)),
    Row("negative_lr", "lr", with_config(train__optimizer__lr=-0.1)),
    Row("unknown_optimizer", "rmsprop", with_config(train__optimizer__name="rmsprop")),
    Row("unknown_nonfinite_mode", "nonfinite", with_config(train__nonfinite="ignore")),
    Row("unknown_strategy", "nosuchstrategy", with_config(strategies=["nosuchstrategy"])),
    Row("unknown_stream", "nosuchstream", with_config(stream={"name": "nosuchstream"})),
    Row("duplicate_strategy", "finetune", with_config(strategies=["finetune", "finetune"])),
    Row("stream_option_unknown", "colours", with_config(stream__options={"num_classes": 4, "colours": 3})),
    Row("stream_without_test_images", "test_per_class", with_config(stream__options={**BASE["stream"]["options"], "test_per_class": 0})),
    Row("stream_option_out_of_range", "difficulty", with_config(stream__options={**BASE["stream"]["options"], "difficulty": 4.0})),
    Row("override_without_equals", "train.epochs", lambda tmp: [write(tmp, config()), "train.epochs"]),
    Row("override_without_key", "names no key", lambda tmp: [write(tmp, config()), "=5"]),
    Row("override_unknown_key", "nosuch", lambda tmp: [write(tmp, config()), "train.nosuch=1"]),
    Row("override_wrong_type", "epochs", lambda tmp: [write(tmp, config()), "train.epochs=[1"]),
    Row("yaml_alias_bomb", "alias", lambda tmp: [write(tmp, ALIAS_BOMB)]),
    Row("name_climbs_out", "name", with_config(name="../../x")),
    # strategy options
    Row("strategy_option_unknown", "bogus", with_config(strategies=[{"name": "finetune", "options": {"bogus": 1}}])),
    Row("strategy_option_float_for_int", "pool_size", with_config(strategies=[{"name": "l2p", "options": {"pool_size": 2.5}}])),
    Row("strategy_option_string_for_bool", "mask_current", with_config(strategies=[{"name": "finetune", "options": {"mask_current": "yes please"}}])),
    # backbone
    Row("backbone_unknown_name", "vit_nosuch", with_config(backbone__name="vit_nosuch_patch16")),
    Row("backbone_negative_depth", "backbone.kwargs", with_config(backbone__kwargs={**TINY_BACKBONE["kwargs"], "depth": -1})),
    Row("backbone_unknown_kwarg", "wings", with_config(backbone__kwargs={**TINY_BACKBONE["kwargs"], "wings": 2})),
    Row("weights_missing", "does not exist", with_config(backbone__weights="no_weights.pth")),
    Row("weights_text", "text file", weights_file("text")),
    Row("weights_non_tensors", "not a state dict of tensors", weights_file("non_tensors")),
    Row("weights_not_a_dict", "not a state dict", weights_file("not_a_dict")),
    Row("weights_wrong_shapes", "do not fit", weights_file("shapes")),
    Row("weights_truncated", "truncated", weights_file("truncated")),
    # streams
    Row("stream_missing_root", "no_such_images", stream_setup("missing_root")),
    Row("stream_empty_folder", "empty_images", stream_setup("empty_folder")),
    Row("stream_not_a_tar", "not a readable tar archive", stream_setup("not_a_tar")),
    Row("stream_truncated_cache", "delete it", stream_setup("truncated_cache")),
    Row("stream_all_corrupt", "unreadable", stream_setup("all_corrupt")),
    # run directories
    Row("run_dir_read_only", "run directory", run_dir_setup("read_only")),
    Row("run_dir_under_a_file", "notes.txt", run_dir_setup("under_file")),
    Row("run_dir_foreign_files", "thesis", run_dir_setup("foreign")),
    Row("run_dir_locked", "busy", run_dir_setup("locked")),
    # resume
    Row("resume_missing_dir", "gone_run", resume_setup("missing")),
    Row("resume_not_a_run", "holiday", resume_setup("not_a_run")),
    Row("resume_damaged_checkpoint", "checkpoint", resume_setup("damaged")),
    Row("resume_checkpoint_missing_keys", "checkpoint", resume_setup("missing_keys")),
    Row("resume_edited_config", "config", resume_setup("edited_config")),
    # test-time
    Row("test_time_config_without_adapt", "adapt", adapt_setup("test_time_without_adapt")),
    Row("adapt_without_trained_head", "head", adapt_setup("adapt_without_head")),
    # plugin modules
    Row("plugin_syntax_error", "myplug.py", plugin_setup("syntax")),
    Row("plugin_import_fails", "lab server is down", plugin_setup("import_fails")),
    Row("plugin_missing_file", "does not exist", plugin_setup("missing")),
    # numerics
    Row("nan_loss", "not finite", plugin_setup("nan_loss")),
    Row("diverging_learning_rate", "learning rate", with_config(train__optimizer={"name": "sgd", "lr": 1e30})),
]


@dataclass
class Outcome:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    new_paths: list[str]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _failed_run_dirs(root: Path, new: set[str]) -> list[Path]:
    out = []
    for rel in new:
        path = root / rel
        if path.name == "summary.json":
            try:
                if json.loads(path.read_text()).get("status") == "failed":
                    out.append(path.parent)
            except (OSError, ValueError):
                pass
    return out


def _unexpected(root: Path, before: set[str]) -> list[str]:
    new = _tree(root) - before
    allowed: set[str] = set()
    for run in _failed_run_dirs(root, new):
        rel = run.relative_to(root)
        allowed.update(str(p.relative_to(root)) for p in run.rglob("*"))
        allowed.update(str(parent) for parent in [rel, *rel.parents] if str(parent) != ".")
    return sorted(p for p in new - allowed if not p.startswith("__pycache__"))


# Interpreter start-up and ``import torch`` take seconds on a busy machine, which sixty rows
# cannot each pay. A launcher process imports the CLI once, then forks one child per row that
# runs ``driftprompt.engine.cli.main`` exactly as ``python -m driftprompt.engine.cli`` does:
# its own process, working directory, argv, stdout, stderr and exit status, and the
# interpreter's own traceback print for an exception that escapes.
LAUNCHER = r"""
import json, os, sys, traceback
import driftprompt.engine.cli as cli
import driftprompt.engine.run, driftprompt.streams.builtin, timm
from driftprompt.engine.plugins import discover
discover()  # import every built-in plugin module once, before forking
jobs = json.loads(sys.stdin.read())
running, done = {}, {}
def reap():
    pid, status = os.wait()
    done[running.pop(pid)] = os.waitstatus_to_exitcode(status)
for key, job in jobs.items():
    while len(running) >= job["parallel"]:
        reap()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1); os.dup2(err, 2)
            sys.argv = ["driftprompt", *job["args"]]
            try:
                code = cli.main(job["args"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code or 0)
    running[pid] = key
while running:
    reap()
print(json.dumps(done))
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DRIFTPROMPT_DATA", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _run_table(base: Path, finished: Path, parallel: int = 2) -> dict[str, Outcome]:
    jobs, befores, cleanups = {}, {}, []
    for row in ROWS:
        tmp = base / row.id
        tmp.mkdir(parents=True)
        result = row.setup(tmp, finished) if row.id.startswith("resume_") else row.setup(tmp)
        if isinstance(result, tuple):
            result, cleanup = result
            cleanups.append(cleanup)
        args = ["-q", *(str(a) for a in result)]
        logs = base / f"{row.id}.log"
        jobs[row.id] = {"cwd": str(tmp), "args": args, "stdout": f"{logs}.out", "stderr": f"{logs}.err", "parallel": parallel}
        befores[row.id] = _tree(tmp)
    try:
        proc = subprocess.run([sys.executable, "-c", LAUNCHER], input=json.dumps(jobs), env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S * 3)
    finally:
        for cleanup in cleanups:
            cleanup()
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        row.id: Outcome(
            jobs[row.id]["args"],
            codes[row.id],
            Path(jobs[row.id]["stdout"]).read_text(errors="replace"),
            Path(jobs[row.id]["stderr"]).read_text(errors="replace"),
            _unexpected(base / row.id, befores[row.id]),
        )
        for row in ROWS
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, finished_run) -> dict[str, Outcome]:
    return _run_table(tmp_path_factory.mktemp("bad_inputs"), finished_run)


def test_the_table_is_broad():
    assert len(ROWS) >= 40 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_stops_with_one_sentence(row: Row, outcomes):
    out = outcomes[row.id]
    shown = f"args={out.args}\n--- stdout\n{out.stdout[-2000:]}\n--- stderr\n{out.stderr[-3000:]}"
    assert out.returncode != 0, shown
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, shown
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), shown
    assert row.keyword.lower() in lines[-1].lower(), f"keyword {row.keyword!r} not in the error line\n{shown}"
    assert not out.new_paths, f"new files besides a failed-run marker: {out.new_paths}\n{shown}"


def test_a_16_bit_image_folder_trains(tmp_path):
    """16-bit PNGs are not a bad input: the run finishes, on images that are not all white."""
    import numpy as np
    from PIL import Image

    for split in ("train", "test"):
        for c, value in (("dark", 0x2000), ("light", 0xA000)):
            for k in range(2):
                d = tmp_path / "imgs" / split / c
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((8, 8), value + 256 * k, dtype=np.uint16)).save(d / f"{k}.png")
    cfg = write(tmp_path, config(stream=folder_stream(tmp_path / "imgs", in_memory=True)))
    proc = subprocess.run(
        [sys.executable, "-m", "driftprompt.engine.cli", "-q", cfg, "--run-dir", "run"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_average_accuracy"] is not None

    from driftprompt.streams.folders import read_folder

    parts, _ = read_folder(tmp_path / "imgs", image_size=16)
    assert sorted({int(v) for v in parts["train"].images.float().mean(dim=(1, 2, 3))}) == [0x20, 0x21, 0xA0, 0xA1]


def test_the_console_entry_point_itself_stops_with_one_sentence(tmp_path):
    """The table's launcher runs the CLI's main; this runs the real ``python -m`` entry point once."""
    write(tmp_path, config(train__epochs=0))
    proc = subprocess.run([sys.executable, "-m", "driftprompt.engine.cli", "-q", "cfg.yaml"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "epochs" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]
