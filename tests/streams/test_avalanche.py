"""The Avalanche adapter: the real library when installed, its documented interface otherwise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from driftprompt.engine import StreamError
from driftprompt.streams import iterate
from driftprompt.streams.avalanche import avalanche_available, from_avalanche


class _Items(torch.utils.data.Dataset):
    """What an AvalancheDataset offers: (x, y, t) items and a ``targets`` sequence."""

    def __init__(self, targets, task=0):
        self.targets = list(targets)
        self.task = task

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.rand(3, 8, 8), self.targets[i], self.task


def _exp(i, classes, per_class=2, task=0):
    targets = [c for c in classes for _ in range(per_class)]
    return SimpleNamespace(dataset=_Items(targets, task), classes_in_this_experience=classes, task_label=task, task_labels=[task], current_experience=i)


def test_documented_interface_class_incremental_with_one_test_experience():
    bench = SimpleNamespace(
        train_stream=[_exp(0, [0, 1]), _exp(1, [2, 3])],
        test_stream=[_exp(0, [0, 1, 2, 3])],
        n_classes=4,
    )
    stream = from_avalanche(bench)
    assert [e.classes for e in stream] == [[0, 1], [2, 3]] and stream.num_classes == 4
    assert sorted(set(stream[1].test.targets.tolist())) == [2, 3]
    images, targets, extras = next(iterate(stream[1].train, 8))
    assert images.shape == (4, 3, 8, 8) and targets.tolist() == [2, 2, 3, 3] and "task_id" not in extras


def test_documented_interface_task_labels_become_task_ids():
    bench = SimpleNamespace(train_stream=[_exp(0, [0, 1], task=0), _exp(1, [2, 3], task=1)], test_stream=[_exp(0, [0, 1], task=0), _exp(1, [2, 3], task=1)], n_classes=4)
    stream = from_avalanche(bench)
    assert [e.task_id for e in stream] == [0, 1] and stream.scenario == "task_incremental"
    assert next(iterate(stream[1].test, 8))[2]["task_id"].tolist() == [1, 1, 1, 1]
    with pytest.raises(StreamError, match="not an Avalanche benchmark"):
        from_avalanche(object())


@pytest.mark.skipif(not avalanche_available(), reason="avalanche-lib is not installed (optional extra: pip install -e '.[avalanche]')")
def test_real_avalanche_benchmark():
    from avalanche.benchmarks.generators import tensors_benchmark

    x = torch.rand(40, 3, 8, 8)
    y = torch.arange(4).repeat_interleave(10)
    bench = tensors_benchmark(train_tensors=[(x[:20], y[:20]), (x[20:], y[20:])], test_tensors=[(x[:20], y[:20]), (x[20:], y[20:])], task_labels=[0, 0])
    stream = from_avalanche(bench)
    assert len(stream) == 2 and stream[0].classes == [0, 1]
    images, _, _ = next(iterate(stream[0].train, 4))
    assert images.shape == (4, 3, 8, 8)
