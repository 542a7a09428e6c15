"""Test-time streams: sample/batch-wise, orders, Dirichlet label shift, the CoTTA protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from driftprompt.engine import StreamError
from driftprompt.streams import CORRUPTIONS, DomainSource, corruption_domains, test_time_stream
from driftprompt.streams.builtin import corruption_test_time
from driftprompt.streams.testtime import dirichlet_order

from .conftest import labelled


def _runs(labels: list[int]) -> int:
    return 1 + sum(a != b for a, b in zip(labels, labels[1:]))


def test_cotta_protocol_sequence_is_complete_and_tagged():
    stream = corruption_test_time(source="synthetic", per_class=2, batch_size=7, seed=0)
    assert [d.name for d in stream.domains] == [f"{c}-5" for c in CORRUPTIONS]
    seen_domains, positions, n = [], [], 0
    for images, targets, extras in stream.batches():
        assert images.dtype == torch.uint8 and len(extras["domain"]) == len(targets) == len(extras["index"])
        seen_domains += extras["domain"]
        positions += extras["position"].tolist()
        n += len(targets)
        assert extras["episodic"] is False
    assert n == stream.num_samples == 15 * 20 and positions == list(range(n))
    order = list(dict.fromkeys(seen_domains))
    assert order == [d.name for d in stream.domains]  # sequential, never revisited
    assert stream.num_batches() == -(-n // 7)


def test_sample_wise_and_deterministic_pixels_across_batch_sizes():
    data = labelled(3, 4, size=16)
    domains = corruption_domains(data, ["gaussian_noise"], [3], seed=1)
    one = test_time_stream(domains, 3, batch_size=1, shuffle=False)
    many = test_time_stream(corruption_domains(data, ["gaussian_noise"], [3], seed=1), 3, batch_size=5, shuffle=False)
    a = torch.cat([b[0] for b in one.batches()])
    b = torch.cat([b[0] for b in many.batches()])
    assert next(one.batches())[0].shape[0] == 1 and torch.equal(a, b)
    assert not torch.equal(a, data.images)


def test_mixed_order_interleaves_domains_and_keeps_every_sample():
    data = labelled(2, 10)
    stream = test_time_stream([DomainSource("a", data), DomainSource("b", data)], 2, batch_size=4, order="mixed", seed=3, expose_boundaries=True)
    domains = [d for _, _, e in stream.batches() for d in e["domain"]]
    assert sorted(domains) == ["a"] * 20 + ["b"] * 20 and _runs(domains) > 4
    ids = sorted((d, int(i)) for _, _, e in stream.batches() for d, i in zip(e["domain"], e["index"]))
    assert ids == sorted([("a", i) for i in range(20)] + [("b", i) for i in range(20)])


def test_dirichlet_label_shift_gives_long_class_runs():
    labels = np.repeat(np.arange(10), 30)
    rng = np.random.default_rng(0)
    strong = labels[dirichlet_order(labels, 0.01, rng)]
    weak = labels[dirichlet_order(labels, 1000.0, np.random.default_rng(0))]
    assert sorted(strong.tolist()) == sorted(labels.tolist())  # a permutation
    assert _runs(strong.tolist()) < 30 < _runs(weak.tolist())
    again = labels[dirichlet_order(labels, 0.01, np.random.default_rng(0))]
    assert np.array_equal(strong, again)
    with pytest.raises(StreamError, match="dirichlet must be positive"):
        dirichlet_order(labels, 0.0, rng)


def test_episodic_flag_and_bad_options():
    data = labelled(2, 2)
    stream = test_time_stream([DomainSource("x", data)], 2, episodic=True)
    assert next(stream.batches())[2]["episodic"] is True
    with pytest.raises(StreamError, match="Unknown test-time order"):
        test_time_stream([DomainSource("x", data)], 2, order="zigzag")
    with pytest.raises(StreamError, match="corruption list is empty"):
        corruption_domains(data, [], [5])
