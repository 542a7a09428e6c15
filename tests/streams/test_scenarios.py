"""Task-, domain-incremental, blurry and online scenarios."""

from __future__ import annotations

import pytest
import torch

from driftprompt.engine import StreamError
from driftprompt.streams import blurry, domain_incremental, iterate, online, online_batches, task_incremental
from driftprompt.streams.builtin import make_scenario

from .conftest import labelled


def test_task_incremental_exposes_task_ids_in_experiences_and_batches():
    data = labelled(7, 4)
    stream = task_incremental(data, data, 3, seed=1)
    assert [e.task_id for e in stream] == [0, 1, 2]
    assert sorted(c for e in stream for c in e.classes) == list(range(7))  # uneven 3/2/2, none dropped
    for exp in stream:
        _, _, extras = next(iterate(exp.test, 5))
        assert extras["task_id"].tolist() == [exp.index] * len(extras["index"])


def test_domain_incremental_keeps_classes_and_deals_disjoint_parts():
    data = labelled(4, 6)
    seen = []

    def shift(images, domain, seed):
        seen.append(domain)
        return images + (1 if domain == "a" else 2)

    stream = domain_incremental(data, data, ["a", "b", "c"], shift, seed=0)
    assert [e.domain for e in stream] == ["a", "b", "c"]
    assert all(e.classes == [0, 1, 2, 3] for e in stream)
    idx = torch.cat([e.train.indices for e in stream])
    assert sorted(idx.tolist()) == list(range(24))  # disjoint and complete
    for exp in stream:
        assert torch.bincount(exp.train.targets).tolist() == [2, 2, 2, 2]  # stratified
        assert next(exp.train.batches(3))[2]["domain"] == [exp.domain] * 3
    shared = domain_incremental(data, data, ["a", "b"], shift, share_samples=True)
    assert all(len(e.train) == 24 for e in shared)
    with pytest.raises(StreamError, match="domain list is empty"):
        domain_incremental(data, data, [], shift)


def test_blurry_moves_exactly_the_leak_fraction_and_keeps_every_sample():
    data = labelled(6, 10)
    stream = blurry(data, data, 3, leak=0.3, seed=0)
    assert sorted(torch.cat([e.train.indices for e in stream]).tolist()) == list(range(60))
    for exp in stream:
        home = exp.major_classes
        at_home = sum(int((exp.train.targets == c).sum()) for c in home)
        assert at_home == 2 * 7  # 10 per class, round(0.3 * 10) = 3 moved away
        assert set(exp.classes) >= set(home)
        assert set(exp.test.targets.tolist()) == set(home)  # test sets are not blurred
    again = blurry(data, data, 3, leak=0.3, seed=0)
    assert all(torch.equal(a.train.indices, b.train.indices) for a, b in zip(stream, again))


def test_i_blurry_keeps_disjoint_classes_at_home():
    data = labelled(6, 10)
    order = [0, 1, 2, 3, 4, 5]
    stream = blurry(data, data, 3, leak=0.5, disjoint_fraction=0.5, class_order=order)
    for exp in stream:
        for c in (0, 1, 2):  # the first half of the order is disjoint
            assert int((exp.train.targets == c).sum()) == (10 if c in exp.major_classes else 0)


def test_online_hides_or_exposes_boundaries():
    data = labelled(4, 3)
    hidden = make_scenario(data, data, [], "x", n_experiences=2, online_pass=True, boundaries=False)
    assert hidden.online and not hidden.boundaries
    batches = list(online_batches(hidden, 4))
    assert sum(len(b[1]) for b in batches) == 12 and all("experience" not in b[2] for b in batches)
    shown = online(make_scenario(data, data, [], "x", n_experiences=2), boundaries=True)
    assert {int(b[2]["experience"][0]) for b in online_batches(shown, 6)} == {0, 1}


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"scenario": "sideways"}, "Unknown scenario 'sideways'"),
        ({"n_experiences": 9}, "between 1 and the number of classes"),
        ({"scenario": "domain_incremental", "domains": ["fogg"]}, "did you mean 'fog'"),
        ({"scenario": "blurry", "leak": 1.5}, r"leak must lie in \[0, 1\]"),
    ],
)
def test_bad_scenarios_say_what_to_fix(options, pattern):
    data = labelled(4, 3)
    with pytest.raises(StreamError, match=pattern):
        make_scenario(data, data, [], "x", **options)
