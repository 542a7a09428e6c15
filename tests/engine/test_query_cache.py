"""The exact query cache: same bits with and without it, hits on evaluation, invalidation,
bypass for augmented or modified inputs and trainable backbones, the memory bound, torchrun."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from driftprompt.engine import hookimpl
from driftprompt.engine.config import validate
from driftprompt.engine.query_cache import ENTRY_OVERHEAD_BYTES, QueryCache, weights_version
from driftprompt.engine.run import build

from ..conftest import TINY_OPTIONS, registry_with, tiny_config

ROOT = Path(__file__).resolve().parents[2]
TEST_IMAGES = 8  # per experience: 2 classes x test_per_class 4


class Recorder:
    """Keeps every evaluation batch's query and logits, in order."""

    def __init__(self) -> None:
        self.records: list[tuple[int, int, torch.Tensor | None, torch.Tensor]] = []

    @hookimpl
    def eval_batch_end(self, state):
        query = state.query.clone() if state.query is not None else None
        self.records.append((state.experience.index, state.eval_experience.index, query, state.logits.clone()))


class ChangeBackbone:
    """Scales one backbone weight in place when experience 1 starts (as a weight update would)."""

    @hookimpl
    def experience_start(self, state):
        if state.experience.index == 1:
            with torch.no_grad():
                state.backbone.model.blocks[0].attn.qkv.weight.mul_(1.5)


class EditInputsInPlace:
    """A third-party augmentation that edits the loader's inputs in place."""

    @hookimpl
    def batch_start(self, state):
        if state.phase == "train":
            state.inputs.mul_(0.5)


class ReplaceInputs:
    """A third-party augmentation that replaces the inputs with a new tensor (and marks nothing)."""

    @hookimpl
    def batch_start(self, state):
        if state.phase == "train":
            state.inputs = state.inputs.flip(-1)


def _config(strategies: list, epochs: int = 1, **query_cache) -> dict:
    """2 experiences x 2 classes: 16 training and 8 test images each."""
    cfg = tiny_config(strategies=[{"name": s, **TINY_OPTIONS.get(s, {})} if isinstance(s, str) else s for s in strategies])
    cfg["train"]["epochs"] = epochs
    cfg["query_cache"] = query_cache
    return cfg


def _run(cfg: dict, **extra_strategies: type):
    recorder = Recorder()
    registry = registry_with(recorder=lambda: recorder, **extra_strategies)
    cfg = {**cfg, "strategies": cfg["strategies"] + ["recorder"]}
    with build(validate(cfg), run_dir=None, registry=registry) as run:
        summary = run.fit()
        params = {f"head.{k}": v.clone() for k, v in run.state.head.state_dict().items()}
        for name, plugin in run.strategies:
            if hasattr(plugin, "state_dict"):
                params.update({f"{name}.{k}": v.clone() for k, v in plugin.state_dict().items() if torch.is_tensor(v)})
        return summary["accuracy"], params, recorder.records, run.state.query_cache.stats()


def _assert_identical(a, b) -> None:
    acc_a, params_a, records_a, _ = a
    acc_b, params_b, records_b, _ = b
    assert acc_a == acc_b
    assert params_a.keys() == params_b.keys() and params_a
    for k in params_a:
        assert torch.equal(params_a[k], params_b[k]), k
    assert len(records_a) == len(records_b)
    for (i, j, qa, la), (i2, j2, qb, lb) in zip(records_a, records_b):
        assert (i, j) == (i2, j2)
        assert (qa is None) == (qb is None)
        if qa is not None:
            assert torch.equal(qa, qb), (i, j)
        assert torch.equal(la, lb), (i, j)


@pytest.mark.parametrize("strategy", ["l2p", "dualprompt"])
def test_cached_run_is_bitwise_identical_and_hits_on_evaluation(strategy):
    cached = _run(_config([strategy]))
    plain = _run(_config([strategy], enabled=False))
    _assert_identical(cached, plain)
    stats = cached[3]
    # evaluation after experience i re-scores experiences 0..i: each test image is computed
    # once, and experience 0's are found again after experience 1
    assert stats["misses"] == 2 * TEST_IMAGES
    assert stats["hits"] == TEST_IMAGES
    assert stats["entries"] == 2 * TEST_IMAGES
    assert plain[3]["hits"] == plain[3]["misses"] == 0


def test_a_changed_backbone_empties_the_cache_and_queries_are_recomputed():
    cached = _run(_config(["l2p", "change"]), change=ChangeBackbone)
    plain = _run(_config(["l2p", "change"], enabled=False), change=ChangeBackbone)
    _assert_identical(cached, plain)
    stats = cached[3]
    assert stats["invalidations"] == TEST_IMAGES  # experience 0's queries, made with the old weights
    assert stats["hits"] == 0 and stats["misses"] == 3 * TEST_IMAGES
    # and the stale query of experience 0 really differs from the new one
    records = cached[2]
    before = next(q for i, j, q, _ in records if (i, j) == (0, 0))
    after = next(q for i, j, q, _ in records if (i, j) == (1, 0))
    assert not torch.equal(before, after)


def test_weights_version_follows_in_place_changes_and_refuses_trainable_or_hooked_backbones():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3)).requires_grad_(False)
    v0 = weights_version(net)
    assert v0 is not None and weights_version(net) == v0
    with torch.no_grad():
        net[0].weight.add_(0.0)  # the same values, but written: the version moves
    assert weights_version(net) != v0
    net.load_state_dict(net.state_dict())
    assert weights_version(net) is not None
    net[0].bias.requires_grad_(True)  # an adapter or a trainable backbone
    assert weights_version(net) is None
    net[0].bias.requires_grad_(False)
    handle = net[1].register_forward_hook(lambda *args: None)
    assert weights_version(net) is None
    handle.remove()
    assert weights_version(net) is not None


def test_train_batches_are_cached_only_on_request_and_never_when_augmented():
    # off by default: training queries are always computed
    default = _run(_config(["l2p"], epochs=2))[3]
    assert default["misses"] == 2 * TEST_IMAGES and default["bypassed"] == 0
    # query_cache.train: the second epoch finds every training image of the first
    train = _run(_config(["l2p"], epochs=2, train=True))[3]
    train_images = 2 * 16
    assert train["hits"] == TEST_IMAGES + train_images
    # augmented batches (ours marks them; others replace or edit the inputs) never use it
    for extra, strategies in ((None, ["augment", "l2p"]), ({"edit": EditInputsInPlace}, ["edit", "l2p"]), ({"replace": ReplaceInputs}, ["replace", "l2p"])):
        stats = _run(_config(strategies, epochs=2, train=True), **(extra or {}))[3]
        assert stats["bypassed"] == 2 * train_images, strategies  # both epochs, every training image
        assert stats["hits"] == TEST_IMAGES, strategies  # evaluation still hits


def test_a_trainable_backbone_bypasses_the_cache():
    state = _run(_config([{"name": "lora", "rank": 2, "alpha": 2.0, "classifier": False}, "l2p"]))[3]
    # the adapters require gradients: no query is stored or found, in training or evaluation
    assert state["hits"] == state["entries"] == 0


def test_the_memory_bound_evicts_and_warns_once(caplog):
    entry = 32 * 4 + ENTRY_OVERHEAD_BYTES  # fp32 queries of the 32-wide test model
    max_mb = 6 * entry / 2**20  # room for 6 of a batch of 8 test images
    with caplog.at_level(logging.WARNING, logger="driftprompt.engine.query_cache"):
        small = _run(_config(["l2p"], max_mb=max_mb))
    plain = _run(_config(["l2p"], enabled=False))
    _assert_identical(small, plain)
    stats = small[3]
    assert stats["entries"] == 6 and stats["bytes"] <= 6 * entry
    # no batch is ever whole in the cache: every query is computed again, the same bits
    assert stats["evictions"] > 0 and stats["hits"] == 0 and stats["misses"] == 3 * TEST_IMAGES
    warnings = [r for r in caplog.records if "query_cache.max_mb" in r.getMessage()]
    assert len(warnings) == 1


def test_zero_megabytes_stores_nothing_and_never_fails():
    stats = _run(_config(["l2p"], max_mb=0))[3]
    assert stats["entries"] == stats["hits"] == 0 and stats["misses"] == 3 * TEST_IMAGES


def test_keys_are_sample_identities_not_batch_positions():
    cache = QueryCache()

    class Exp:
        def __init__(self, index):
            self.index = index

    backbone = torch.nn.Linear(4, 2).requires_grad_(False)
    backbone.query = lambda x: backbone(x)  # type: ignore[attr-defined]
    from driftprompt.engine.state import State

    state = State(backbone=backbone, head=None, device=torch.device("cpu"), phase="eval", query_cache=cache)
    x = torch.randn(6, 4)

    def query(rows, exp, ids):
        state.clear_batch()
        state.eval_experience = Exp(exp)
        state.inputs = x[rows]
        state.batch = {"index": torch.tensor(ids)}
        cache.begin_batch(state)
        return state.compute_query()

    first = query([0, 1, 2], 0, [10, 11, 12])
    assert cache.stats()["misses"] == 3
    assert torch.equal(query([0, 1, 2], 0, [10, 11, 12]), first) and cache.hits == 3
    # the same indices in another experience's test set are other images
    other = query([3, 4, 5], 1, [10, 11, 12])
    assert torch.equal(other, backbone(x[[3, 4, 5]])) and cache.hits == 3
    # the same samples in another batch composition are computed again (exactness)
    query([1, 2], 0, [11, 12])
    assert cache.hits == 3
    # repeated indices, or none, never use the cache
    query([0, 0], 0, [10, 10])
    state.clear_batch()
    state.inputs, state.batch = x[:2], {}
    cache.begin_batch(state)
    state.compute_query()
    assert cache.hits == 3
    # test-time adaptation never uses it
    state.phase = "adapt"
    query([0, 1, 2], 0, [10, 11, 12])
    assert cache.hits == 3


def test_config_section_validates():
    cfg = validate(tiny_config())
    assert cfg.query_cache.enabled and cfg.query_cache.max_mb == 1024 and not cfg.query_cache.train
    from driftprompt.engine import ConfigError

    with pytest.raises(ConfigError, match="max_mb"):
        validate({**tiny_config(), "query_cache": {"max_mb": -1}})


STATS_PLUGIN = textwrap.dedent('''
    import json, os, torch
    from driftprompt.engine import hookimpl

    class DumpQueries:
        """Checks every evaluation query against a fresh computation on the same shard."""

        def __init__(self):
            self.same = []

        @hookimpl
        def eval_batch_end(self, state):
            self.same.append(bool(torch.equal(state.query, state.backbone.query(state.inputs))))

        @hookimpl
        def fit_end(self, state):
            out = {"stats": state.query_cache.stats(), "same": self.same}
            with open(os.environ["DUMP_DIR"] + f"/rank{state.dist.rank}.json", "w") as f:
                json.dump(out, f)

    @hookimpl
    def register_strategies(register):
        register("dump_queries", DumpQueries)
''')


def test_two_processes_cache_their_own_shards_exactly(tmp_path):
    (tmp_path / "dump.py").write_text(STATS_PLUGIN)
    cfg = _config(["l2p", "dump_queries"])
    cfg["plugin_modules"] = [str(tmp_path / "dump.py")]
    cfg["distributed"] = {"timeout_s": 60}
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), str(path), "--run-dir", str(tmp_path / "run"), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DUMP_DIR": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        dump = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # every evaluation batch's query (cached or not) equals a fresh pass over that shard
        assert dump["same"] == [True] * 3
        # each process sees half of every test batch, 4 of the 8 images, and caches its half
        assert dump["stats"]["misses"] == 2 * TEST_IMAGES // 2
        assert dump["stats"]["hits"] == TEST_IMAGES // 2
