"""Class-incremental splits and the synthetic dataset."""

from __future__ import annotations

import pytest
import torch

from driftprompt.engine import StreamError
from driftprompt.streams import TensorImageDataset, class_incremental, iterate, synthetic_split
from driftprompt.streams.builtin import synthetic_class_incremental


def _data(num_classes: int, per_class: int = 3) -> TensorImageDataset:
    targets = torch.arange(num_classes).repeat_interleave(per_class)
    return TensorImageDataset(torch.zeros(len(targets), 3, 4, 4, dtype=torch.uint8), targets)


def test_classes_are_disjoint_complete_and_uneven_counts_are_spread():
    data = _data(10)
    stream = class_incremental(data, data, 3, seed=None)
    sizes = [len(e.classes) for e in stream]
    assert sizes == [4, 3, 3]
    all_classes = [c for e in stream for c in e.classes]
    assert sorted(all_classes) == list(range(10))
    for exp in stream:
        assert set(exp.train.targets.tolist()) == set(exp.classes)
        assert len(exp.train) == 3 * len(exp.classes)
    # sample identity survives the split
    assert sorted(torch.cat([e.train.indices for e in stream]).tolist()) == list(range(30))


def test_class_order_and_seed():
    data = _data(6)
    explicit = class_incremental(data, data, 3, class_order=[5, 4, 3, 2, 1, 0])
    assert [e.classes for e in explicit] == [[4, 5], [2, 3], [0, 1]]
    a = class_incremental(data, data, 3, seed=7)
    b = class_incremental(data, data, 3, seed=7)
    c = class_incremental(data, data, 3, seed=8)
    assert [e.classes for e in a] == [e.classes for e in b]
    assert [e.classes for e in a] != [e.classes for e in c]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"n_experiences": 7}, "between 1 and the number of classes"),
        ({"n_experiences": 0}, "between 1 and the number of classes"),
        ({"n_experiences": 2, "class_order": [0, 1, 2, 3, 4]}, r"missing \[5\]"),
        ({"n_experiences": 2, "class_order": [0, 1, 2, 3, 4, 4, 5]}, r"repeated \[4\]"),
    ],
)
def test_bad_splits_say_what_to_fix(kwargs, pattern):
    data = _data(6)
    with pytest.raises(StreamError, match=pattern):
        class_incremental(data, data, **kwargs)


def test_empty_dataset_is_refused():
    empty = TensorImageDataset(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(StreamError, match="no samples"):
        class_incremental(empty, empty, 1)


def test_synthetic_is_deterministic_and_train_test_differ():
    a_train, a_test = synthetic_split(num_classes=3, train_per_class=4, test_per_class=2, image_size=8, seed=1)
    b_train, _ = synthetic_split(num_classes=3, train_per_class=4, test_per_class=2, image_size=8, seed=1)
    assert torch.equal(a_train.images, b_train.images) and a_train.images.dtype == torch.uint8
    assert a_train.images.shape == (12, 3, 8, 8) and a_test.images.shape == (6, 3, 8, 8)
    assert not torch.equal(a_train.images[:6], a_test.images)


def test_synthetic_classes_are_separable():
    # the class signal is real: nearest class mean in pixel space beats chance by far
    train, test = synthetic_split(num_classes=5, train_per_class=40, test_per_class=20, image_size=16, seed=0)
    means = torch.stack([train.images[train.targets == c].float().mean(0).flatten() for c in range(5)])
    pred = torch.cdist(test.images.float().flatten(1), means).argmin(1)
    assert (pred == test.targets).float().mean() > 0.6


def test_batches_cover_every_sample_once_and_shuffle_with_a_generator():
    stream = synthetic_class_incremental(num_classes=4, n_experiences=2, train_per_class=5, test_per_class=2, image_size=8)
    exp = stream[0]
    seen = torch.cat([extras["index"] for _, _, extras in iterate(exp.train, 3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(exp.train.indices.tolist())
    again = torch.cat([extras["index"] for _, _, extras in iterate(exp.train, 3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(seen, again)


def test_generic_datasets_go_through_a_dataloader():
    class Items(torch.utils.data.Dataset):
        targets = [0, 1, 1]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(3, 4, 4), self.targets[i]

    stream = class_incremental(Items(), Items(), 2, seed=None)
    batches = list(iterate(stream[1].train, 8))
    assert batches[0][0].shape == (2, 3, 4, 4) and batches[0][1].tolist() == [1, 1]
