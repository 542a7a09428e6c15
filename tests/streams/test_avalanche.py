"""The Avalanche adapter: its documented interface with stand-ins, and real avalanche-lib 0.6 benchmarks when the extra is installed.

The real-Avalanche tests build every dataset in memory (nothing is downloaded) and are skipped,
with the reason, when avalanche-lib is absent (``pip install -e ".[avalanche]"``).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from driftprompt.engine import StreamError
from driftprompt.streams import iterate, online_batches
from driftprompt.streams.avalanche import avalanche_available, from_avalanche, scenario_kind

needs_avalanche = pytest.mark.skipif(not avalanche_available(), reason="avalanche-lib is not installed (optional extra: pip install -e '.[avalanche]')")


# ---------------------------------------------------------------- stand-ins (always run)


class _Items(torch.utils.data.Dataset):
    """What an AvalancheDataset offers: (x, y, t) items and a ``targets`` sequence."""

    def __init__(self, targets, task=0, low=0.0, high=1.0):
        self.targets = list(targets)
        self.task = task
        self.low, self.high = low, high

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.low + (self.high - self.low) * torch.rand(3, 8, 8), self.targets[i], self.task


def _exp(i, classes, per_class=2, task=0, **items):
    targets = [c for c in classes for _ in range(per_class)]
    return SimpleNamespace(dataset=_Items(targets, task, **items), classes_in_this_experience=classes, task_label=task, task_labels=[task], current_experience=i)


def test_documented_interface_class_incremental_with_one_test_experience():
    bench = SimpleNamespace(
        train_stream=[_exp(0, [0, 1]), _exp(1, [2, 3])],
        test_stream=[_exp(0, [0, 1, 2, 3])],
        n_classes=4,
    )
    stream = from_avalanche(bench)
    assert [e.classes for e in stream] == [[0, 1], [2, 3]] and stream.num_classes == 4 and stream.scenario == "class_incremental"
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


def test_scenario_kind_from_classes_and_task_labels():
    assert scenario_kind([{0, 1}, {2, 3}], [[0], [0]]) == "class_incremental"
    assert scenario_kind([{0, 1}, {2, 3}], [[0], [1]]) == "task_incremental"
    assert scenario_kind([{0, 1, 2}, {1, 2, 3}], [[0], [0]]) == "domain_incremental"


def test_new_instances_with_one_shared_test_set_fill_one_column():
    shared = _exp(0, [0, 1, 2], per_class=3)
    bench = SimpleNamespace(train_stream=[_exp(0, [0, 1, 2]), _exp(1, [0, 1, 2]), _exp(2, [0, 1, 2])], test_stream=[shared], n_classes=3)
    stream = from_avalanche(bench)
    assert stream.scenario == "domain_incremental"
    assert [len(e.test) for e in stream] == [9, 0, 0]  # the shared set once, not three identical columns
    assert all(e.classes == [0, 1, 2] for e in stream)


def test_normalised_items_are_refused_with_the_fix():
    bench = SimpleNamespace(train_stream=[_exp(0, [0, 1], low=-2.4, high=2.7)], test_stream=[_exp(0, [0, 1])])
    with pytest.raises(StreamError, match="already normalised.*remove Normalize"):
        from_avalanche(bench)


def test_unknown_scenario_and_mismatched_test_stream_name_the_fix():
    bench = SimpleNamespace(train_stream=[_exp(0, [0]), _exp(1, [1]), _exp(2, [2])], test_stream=[_exp(0, [0]), _exp(1, [1])])
    with pytest.raises(StreamError, match="2 experiences for 3 train experiences; use a test stream with one experience or one per train experience"):
        from_avalanche(bench)
    with pytest.raises(StreamError, match="use one of class_incremental, task_incremental, domain_incremental"):
        from_avalanche(bench, scenario="new_instances")


# ---------------------------------------------------------------- real avalanche-lib (extra installed)


class _Tensors(torch.utils.data.TensorDataset):
    """uint8 (N, 3, S, S) images and labels, with the ``targets`` Avalanche reads."""

    def __init__(self, classes, per_class, size=16, seed=0):
        gen = torch.Generator().manual_seed(seed)
        targets = torch.tensor([c for c in classes for _ in range(per_class)])
        super().__init__(torch.randint(0, 256, (len(targets), 3, size, size), dtype=torch.uint8, generator=gen), targets)

    @property
    def targets(self):
        return self.tensors[1]


class _TorchvisionStyle(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 is: uint8 HWC ``data``, ``targets``, PIL items through its own ``transform``."""

    def __init__(self, n_classes, per_class, size=16, seed=0, transform=None):
        self.targets = [c for c in range(n_classes) for _ in range(per_class)]
        self.data = np.random.default_rng(seed).integers(0, 256, (len(self.targets), size, size, 3), dtype=np.uint8)
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        image = Image.fromarray(self.data[i])
        return (self.transform(image) if self.transform else image), self.targets[i]


def _cifar_transforms():
    """SplitCIFAR10's default transform groups (ContinualAI/avalanche v0.6.0 avalanche/benchmarks/classic/ccifar10.py:23-37), at 16 px."""
    from torchvision import transforms

    norm = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    train = transforms.Compose([transforms.RandomCrop(16, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    return train, transforms.Compose([transforms.ToTensor(), norm])


def _pixels(images):
    return {img.permute(1, 2, 0).contiguous().numpy().tobytes() for img in images}


@needs_avalanche
def test_real_nc_benchmark_of_tensors_reads_the_stored_pixels():
    from avalanche.benchmarks import nc_benchmark

    train, test = _Tensors(range(4), 10, seed=0), _Tensors(range(4), 5, seed=1)
    bench = nc_benchmark(train, test, n_experiences=2, task_labels=False, fixed_class_order=[2, 0, 3, 1])
    stream = from_avalanche(bench)
    assert stream.scenario == "class_incremental" and stream.num_classes == 4 and not stream.online
    assert [e.classes for e in stream] == [[0, 2], [1, 3]] and [e.task_id for e in stream] == [None, None]
    assert [len(e.train) for e in stream] == [20, 20] and set(stream[1].test.targets.tolist()) == {1, 3}
    images, targets, extras = next(iterate(stream[0].train, 64))
    assert images.dtype == torch.uint8 and sorted(set(targets.tolist())) == [0, 2] and "task_id" not in extras
    assert _pixels(images) <= _pixels(train.tensors[0])


@needs_avalanche
def test_real_nc_benchmark_with_task_labels_is_task_incremental_with_remapped_classes():
    from avalanche.benchmarks import nc_benchmark

    train, test = _Tensors(range(4), 4, seed=0), _Tensors(range(4), 2, seed=1)
    bench = nc_benchmark(train, test, n_experiences=2, task_labels=True, fixed_class_order=[0, 1, 2, 3], class_ids_from_zero_in_each_exp=True)
    stream = from_avalanche(bench)
    assert stream.scenario == "task_incremental" and [e.task_id for e in stream] == [0, 1]
    # Avalanche's class remapping is a frozen transform: it survives the removal of the transform group
    assert [e.classes for e in stream] == [[0, 1], [0, 1]]
    _, targets, extras = next(iterate(stream[1].test, 64))
    assert sorted(set(targets.tolist())) == [0, 1] and extras["task_id"].tolist() == [1] * 4


@needs_avalanche
def test_real_splitcifar_style_transforms_are_not_applied_twice():
    from avalanche.benchmarks import nc_benchmark

    train_tf, eval_tf = _cifar_transforms()
    train, test = _TorchvisionStyle(4, 6, seed=0), _TorchvisionStyle(4, 3, seed=1)
    bench = nc_benchmark(train, test, n_experiences=2, task_labels=False, seed=0, train_transform=train_tf, eval_transform=eval_tf)
    normalised = bench.train_stream[0].dataset[0][0]
    assert normalised.dtype == torch.float32 and normalised.min() < 0  # what Avalanche itself hands out
    stream = from_avalanche(bench)
    images, _, _ = next(iterate(stream[0].train, 64))
    test_images, _, _ = next(iterate(stream[1].test, 64))
    # raw uint8 pixels, exactly as stored: no crop, no flip, no normalisation for the backbone to repeat
    assert images.dtype == torch.uint8 and test_images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
    source = {img.tobytes() for img in train.data}
    assert {img.permute(1, 2, 0).contiguous().numpy().tobytes() for img in images} <= source
    assert {img.permute(1, 2, 0).contiguous().numpy().tobytes() for img in test_images} <= {img.tobytes() for img in test.data}
    with pytest.raises(StreamError, match="already normalised"):
        from_avalanche(bench, keep_transforms=True)


@needs_avalanche
def test_real_dataset_that_normalises_in_its_own_transform_is_refused():
    from avalanche.benchmarks import nc_benchmark

    _, eval_tf = _cifar_transforms()
    bench = nc_benchmark(_TorchvisionStyle(2, 2, transform=eval_tf), _TorchvisionStyle(2, 2, seed=1, transform=eval_tf), n_experiences=2, task_labels=False, seed=0)
    with pytest.raises(StreamError, match=r"already normalised \(values -2\.\d\d\.\.2\.\d\d\).*remove Normalize from the wrapped dataset's own transform"):
        from_avalanche(bench)


class _VaryingSizes(torch.utils.data.Dataset):
    """Image files of different sizes, as ``paths_benchmark`` reads them."""

    targets = [0, 1] * 3

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return Image.fromarray(np.full((10 + i, 12 + i, 3), i, dtype=np.uint8)), self.targets[i]


@needs_avalanche
def test_real_images_of_different_sizes_need_a_resizing_transform_group():
    from avalanche.benchmarks import nc_benchmark
    from torchvision import transforms

    resize = transforms.Compose([transforms.Resize((16, 16)), transforms.PILToTensor()])
    bench = nc_benchmark(_VaryingSizes(), _VaryingSizes(), n_experiences=2, task_labels=False, fixed_class_order=[0, 1], train_transform=resize, eval_transform=resize)
    with pytest.raises(StreamError, match=r"differ in size \(10x12 and 12x14\).*keep_transforms=True"):
        next(iterate(from_avalanche(bench)[0].train, 8))
    images, _, _ = next(iterate(from_avalanche(bench, keep_transforms=True)[0].train, 8))
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8


@needs_avalanche
def test_real_benchmark_from_datasets_takes_classes_from_the_targets():
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset, as_classification_dataset

    parts = [as_classification_dataset(_Tensors(classes, 3, seed=k)) for k, classes in enumerate([[0, 1], [2, 3], [0, 1], [2, 3]])]
    bench = benchmark_from_datasets(train=parts[:2], test=parts[2:])
    assert not hasattr(bench.train_stream[0], "classes_in_this_experience")  # the new API's DatasetExperience
    stream = from_avalanche(bench)
    assert stream.scenario == "class_incremental" and stream.num_classes == 4
    assert [e.classes for e in stream] == [[0, 1], [2, 3]] and [len(e.test) for e in stream] == [6, 6]
    # a plain AvalancheDataset has no targets attribute: they are read from its items
    plain = [AvalancheDataset([torch.utils.data.TensorDataset(d.tensors[0], d.tensors[1])]) for d in (_Tensors([0, 1], 2), _Tensors([2], 2, seed=1))]
    stream = from_avalanche(benchmark_from_datasets(train=plain, test=plain))
    assert [e.classes for e in stream] == [[0, 1], [2]] and stream.num_classes == 3


@needs_avalanche
def test_real_split_online_stream_becomes_an_online_stream():
    from avalanche.benchmarks import CLScenario, nc_benchmark, split_online_stream

    train, test = _Tensors(range(4), 10, seed=0), _Tensors(range(4), 3, seed=1)
    bench = nc_benchmark(train, test, n_experiences=2, task_labels=False, fixed_class_order=[0, 1, 2, 3])
    online = split_online_stream(bench.train_stream, experience_size=7, seed=0)
    subs = list(online)
    assert len(subs) == 6 and len(bench.test_stream) == 2  # more sub-experiences than test experiences
    stream = from_avalanche(train_stream=online, test_stream=bench.test_stream)
    assert stream.online and not stream.boundaries and stream.scenario == "class_incremental"
    assert [e.classes for e in stream] == [[0, 1], [2, 3]] and [len(e.train) for e in stream] == [20, 20] and [len(e.test) for e in stream] == [6, 6]
    # arrival order is the online split's: its sub-experiences one after another
    arrival = torch.stack([d.remove_current_transform_group()[k][0] for s in subs[:3] for d in [s.dataset] for k in range(len(d))])
    assert torch.equal(next(iterate(stream[0].train, 64))[0], arrival)
    assert sum(len(t) for _, t, _ in online_batches(stream, 8)) == 40
    exposed = from_avalanche(CLScenario([split_online_stream(bench.train_stream, 7, access_task_boundaries=True, seed=0), bench.test_stream]))
    assert exposed.online and exposed.boundaries and len(exposed) == 2


@needs_avalanche
def test_real_ni_benchmark_is_domain_incremental_with_one_test_column(tmp_path, make_config):
    from avalanche.benchmarks import ni_benchmark

    from driftprompt.engine.plugins import Registered, discover
    from driftprompt.engine.run import build

    train, test = _Tensors(range(4), 6, seed=0), _Tensors(range(4), 2, seed=1)
    bench = ni_benchmark(train, test, n_experiences=3, seed=0, balance_experiences=True)
    assert len(bench.test_stream) == 1  # one full test set for every experience
    stream = from_avalanche(bench)
    assert stream.scenario == "domain_incremental" and stream.num_classes == 4
    assert [e.classes for e in stream] == [[0, 1, 2, 3]] * 3 and [len(e.train) for e in stream] == [8, 8, 8]
    assert [len(e.test) for e in stream] == [8, 0, 0]

    registry = discover()
    registry.streams["avalanche_ni"] = Registered("avalanche_ni", lambda: stream, "tests")
    config = make_config()
    config = config.model_copy(update={"stream": config.stream.model_copy(update={"name": "avalanche_ni", "options": {}})})
    with build(config, run_dir=None, registry=registry) as run:
        summary = run.fit()
    acc = summary["accuracy"]
    assert [row[0] is not None for row in acc] == [True] * 3 and all(v is None for row in acc for v in row[1:])
    assert summary["empty_test_experiences"] == [1, 2]
    assert summary["final_average_accuracy"] == acc[2][0]
    assert math.isclose(summary["average_incremental_accuracy"], sum(row[0] for row in acc) / 3)
    column = [row[0] for row in acc]
    # never averaged over copies of one column: the drop of that column from its best row
    assert summary["forgetting"] == pytest.approx(max(column[:-1]) - column[-1])

    with pytest.raises(StreamError, match="task label per train experience but one shared test set"):
        from_avalanche(ni_benchmark(train, test, n_experiences=2, task_labels=True, seed=0))


@needs_avalanche
def test_real_new_api_generators_map_to_their_stream_kinds():
    from avalanche.benchmarks import benchmark_from_datasets, class_incremental_benchmark, new_instances_benchmark, task_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset

    data = as_classification_dataset(_Tensors(range(4), 5))
    stream = from_avalanche(class_incremental_benchmark({"train": data, "test": data}, num_experiences=2, class_order=[3, 1, 0, 2]))
    assert stream.scenario == "class_incremental" and [e.classes for e in stream] == [[1, 3], [0, 2]] and [len(e.test) for e in stream] == [10, 10]
    stream = from_avalanche(new_instances_benchmark(data, data, num_experiences=2, seed=0))
    assert stream.scenario == "domain_incremental" and [len(e.test) for e in stream] == [20, 0]
    halves = [as_classification_dataset(_Tensors([0, 1], 2, seed=k)) for k in range(2)]
    stream = from_avalanche(task_incremental_benchmark(benchmark_from_datasets(train=halves, test=halves)))
    assert stream.scenario == "task_incremental" and [e.task_id for e in stream] == [0, 1] and [e.classes for e in stream] == [[0, 1], [0, 1]]
