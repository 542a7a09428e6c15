"""train.compile, fused optimizers and device-resident batches.

On the CPU, compilation is checked with the ``aot_eager`` backend: it traces the same graph
(Dynamo, then AOTAutograd forward and backward) as ``inductor`` but runs it with the eager
kernels, in seconds instead of minutes of C++ code generation on a small machine.
"""

from __future__ import annotations

import logging

import pytest
import torch

from driftprompt.engine import compile as dpcompile
from driftprompt.engine.backbones import ViTBackbone
from driftprompt.engine.config import validate
from driftprompt.engine.errors import BackboneError
from driftprompt.engine.optim import build_optimizer
from driftprompt.engine.prompts import Prompts
from driftprompt.engine.run import build
from driftprompt.streams.base import TensorImageDataset

from ..conftest import TINY_BACKBONE, TINY_OPTIONS, tiny_config


def tiny_vit() -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone(TINY_BACKBONE["name"], "random", **TINY_BACKBONE["kwargs"])


def prompts_like_strategies(batch: int, generator: torch.Generator) -> Prompts:
    """L2P-style per-sample tokens with the prompt-mean pool, and a DualPrompt-style prefix."""
    p = Prompts(pool="prompt_mean")
    p.add_tokens(torch.randn(batch, 4, 32, generator=generator).requires_grad_())
    p.add_prefix(1, torch.randn(2, 32, generator=generator), torch.randn(2, 32, generator=generator))
    return p


def test_compiled_forward_gives_the_eager_features_and_gradients_in_fp32() -> None:
    backbone = tiny_vit()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g)
    prompts = prompts_like_strategies(3, g)
    eager = backbone(x, prompts)
    (eager_grad,) = torch.autograd.grad(eager.sum(), prompts.tokens[0])
    assert dpcompile.compile_backbone(backbone, backend="aot_eager", compile_after=1)
    compiled = backbone(x, prompts)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), prompts.tokens[0])
    assert backbone.compiled_forward.failed is None
    assert len(backbone.compiled_forward.graphs) == 1
    assert torch.equal(eager, compiled)
    assert torch.allclose(eager_grad, compiled_grad, atol=1e-6, rtol=1e-5)
    # the same layout reuses its graph; the frozen query pass (no prompts, no grad) is another
    backbone(x, prompts_like_strategies(3, g))
    assert len(backbone.compiled_forward.graphs) == 1
    with torch.no_grad():
        assert torch.equal(backbone.query(x), backbone.forward_tokens_eager(x)[:, 0])
    assert len(backbone.compiled_forward.graphs) == 2


def test_a_failing_compile_falls_back_to_eager_with_one_warning_naming_the_cause(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    backbone = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    expected = backbone(x)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found. Install one")

    monkeypatch.setattr(torch, "compile", broken)
    assert dpcompile.compile_backbone(backbone)
    with caplog.at_level(logging.WARNING, logger="driftprompt.engine.compile"):
        assert torch.equal(backbone(x), expected)
        assert torch.equal(backbone(x), expected)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "driftprompt.engine.compile"]
    assert warned == ["torch.compile of the prompted backbone failed (RuntimeError: no C++ compiler found); running eager instead. Set train.compile: false to skip compilation."]
    assert backbone.compiled_forward.failed == "RuntimeError: no C++ compiler found"


def test_a_user_error_inside_the_compiled_pass_is_raised_not_hidden_by_the_fallback() -> None:
    backbone = tiny_vit()
    dpcompile.compile_backbone(backbone, backend="aot_eager", compile_after=1)
    p = Prompts()
    p.add_deep(0, torch.randn(2, 32))
    p.add_deep(1, torch.randn(3, 32))  # two deep-prompt lengths
    with pytest.raises(BackboneError, match="Deep prompts must keep one length"):
        backbone(torch.randn(1, 3, 16, 16), p)


def test_compile_is_off_by_default_auto_means_cuda_and_compile_true_compiles(make_config) -> None:
    config = make_config()
    assert config.train.compile is False and config.train.data_on_device == "auto" and config.train.cuda_graphs is False
    assert not dpcompile.wants(config.train.compile, torch.device("cpu"))
    assert not dpcompile.wants(config.train.compile, torch.device("cuda"))
    assert not dpcompile.wants("auto", torch.device("cpu")) and dpcompile.wants("auto", torch.device("cuda"))
    with build(config, run_dir=None) as run:
        run.loop._init()
        allowed = run.loop.begin_experience(0)
        images, targets, extras = next(run.stream[0].train.batches(8))
        run.loop.train_step(images, targets, extras, allowed)
        assert run.state.backbone.__dict__.get("compiled_forward") is None
        assert run.stream[0].train.resident is None
    on = validate(tiny_config(train={**tiny_config()["train"], "compile": True, "compile_backend": "aot_eager"}))
    with build(on, run_dir=None) as run:
        run.loop._init()
        allowed = run.loop.begin_experience(0)
        images, targets, extras = next(run.stream[0].train.batches(8))
        run.loop.train_step(images, targets, extras, allowed)
        assert not run.state.backbone.compiled_forward.graphs  # a layout compiles on its second pass
        run.loop.train_step(images, targets, extras, allowed)
        assert run.state.backbone.compiled_forward.graphs


def accuracy_matrix(strategy: dict, compile_: bool, backend: str = "aot_eager") -> list[list[float]]:
    """The demo's ViT and synthetic stream, cut to two experiences of one epoch."""
    cfg = tiny_config(strategies=[strategy])
    cfg["backbone"] = {"name": "vit_small_patch16_224", "weights": "random", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}}
    cfg["stream"]["options"].update({"num_classes": 4, "n_experiences": 2, "train_per_class": 12, "test_per_class": 6, "image_size": 32})
    cfg["train"].update({"batch_size": 8, "compile": compile_, "compile_backend": backend})
    torch.manual_seed(0)
    with build(validate(cfg), run_dir=None) as run:
        matrix = run.loop.fit()
        if compile_:
            assert run.state.backbone.compiled_forward.graphs and run.state.backbone.compiled_forward.failed is None
        return matrix.to_list()


# l2p through AOTAutograd (its forward and backward graphs); coda_prompt through Dynamo's graphs
# alone ("eager" backend), which keeps the test short on a small machine
@pytest.mark.parametrize(("name", "backend"), [("l2p", "aot_eager"), ("coda_prompt", "eager")])
def test_compiled_run_gives_the_eager_accuracy_matrix_in_fp32(name: str, backend: str) -> None:
    strategy = {"name": name, **TINY_OPTIONS[name]}
    assert accuracy_matrix(strategy, True, backend) == accuracy_matrix(strategy, False)


def test_adam_is_unfused_on_the_cpu(make_config) -> None:
    options = make_config().train.optimizer
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(3))], "name": "p"}], options)
    assert not opt.defaults.get("fused")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused Adam is chosen on CUDA only")
def test_adam_is_fused_on_cuda(make_config) -> None:
    options = make_config().train.optimizer
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(3, device="cuda"))], "name": "p"}], options)
    assert opt.defaults.get("fused") is True


def test_resident_dataset_cuts_the_same_batches_on_the_device() -> None:
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    data = TensorImageDataset(images, torch.arange(10) % 3, tags={"task_id": 1})
    plain = list(data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    data.to_device("meta")  # a device that is not the CPU; only shapes and dtypes exist there
    resident = list(data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [b[0].device.type for b in resident] == ["meta"] * 3
    assert [b[0].dtype for b in resident] == [torch.uint8] * 3
    assert [b[0].shape for b in resident] == [b[0].shape for b in plain]
    for (_, _, e1), (_, _, e2) in zip(plain, resident):
        assert torch.equal(e1["index"], e2["index"]) and e2["index"].device.type == "cpu"
        assert torch.equal(e1["task_id"], e2["task_id"])
    assert data.images.device.type == "cpu"  # the dataset itself is unchanged
    data.to_device("cpu")
    assert data.resident is None


def test_a_dataset_made_resident_mid_pass_keeps_its_order() -> None:
    images = torch.arange(6 * 3 * 2 * 2, dtype=torch.float32).reshape(6, 3, 2, 2)
    data = TensorImageDataset(images, torch.arange(6))
    expected = [t.tolist() for _, t, _ in data.batches(2, shuffle=True, generator=torch.Generator().manual_seed(3))]
    it = data.batches(2, shuffle=True, generator=torch.Generator().manual_seed(3))
    got = [next(it)[1].tolist()]
    data.resident = (data.images.clone(), data.targets.clone())  # what to_device holds, here on the CPU
    got += [t.tolist() for _, t, _ in it]
    assert got == expected


def test_a_pass_with_a_module_hook_runs_eager_so_the_hook_sees_it() -> None:
    backbone = tiny_vit()
    dpcompile.compile_backbone(backbone, backend="eager", compile_after=1)
    x = torch.randn(2, 3, 16, 16)
    backbone(x)  # compiled without hooks
    seen = []
    handle = backbone.model.blocks[1].norm1.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    backbone(x)
    handle.remove()
    assert seen == [torch.Size([2, 5, 32])]
    assert len(backbone.compiled_forward.graphs) == 1


def test_a_run_asking_compile_where_it_fails_trains_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config(strategies=[{"name": "l2p", **TINY_OPTIONS["l2p"]}])
    torch.manual_seed(0)
    with build(validate(cfg), run_dir=None) as run:
        eager = run.loop.fit().to_list()

    def broken(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", broken)
    cfg["train"]["compile"] = True
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="driftprompt.engine.compile"), build(validate(cfg), run_dir=None) as run:
        assert run.loop.fit().to_list() == eager
    warned = [r.getMessage() for r in caplog.records if r.name == "driftprompt.engine.compile" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "RuntimeError: Dynamo is not supported on this Python" in warned[0]
