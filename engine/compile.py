"""Compiled prompted forward passes and device-resident batches: the GPU-bound training step.

:class:`PromptedCompile` runs :meth:`ViTBackbone.forward_tokens` through ``torch.compile``
with ``dynamic=False``: one graph per *layout* (which prompt slots are filled, the shape of
every prompt tensor and of the input, grad and autocast mode). A strategy's prompt lengths are
fixed by its options (L2P's ``top_k * prompt_length`` tokens, DualPrompt's G/E prefixes at
fixed blocks, CODA-Prompt's prefixes at fixed blocks), so a run meets a handful of layouts
(train, eval, the query pass, and the shorter last batch of a split) and reuses their graphs
for every other step. Where compilation fails (no compiler, an unsupported operator, a
backend missing), the pass falls back to the eager forward, with one warning naming the cause.

:func:`prepare_step` is what ``ContinualLoop.train_step`` and ``eval_step`` call first: it
compiles the backbone once when ``train.compile`` asks for it (``auto``: on CUDA), and makes an
in-memory dataset resident on the device (``train.data_on_device``) so that batches are cut
there, as uint8, with no host-to-device copy per step.

With every option off (the CPU defaults) nothing here runs and the eager path is unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from .errors import DriftpromptError
from .prompts import Prompts

log = logging.getLogger(__name__)

MAX_GRAPHS = 32  # layouts compiled per backbone; further layouts run eager (logged once)
COMPILE_AFTER = 2  # a layout is compiled on its second pass: a one-off shape (a split's last batch) stays eager


def _flatten(prompts: Prompts | None) -> tuple[tuple[Any, ...], list[torch.Tensor]]:
    """A static description of ``prompts`` and the tensors it holds, in a fixed order."""
    if prompts is None:
        return ("none",), []
    tensors: list[torch.Tensor] = list(prompts.tokens)
    deep = tuple(sorted(prompts.deep))
    tensors += [prompts.deep[i] for i in deep]
    prefix = tuple((i, len(prompts.prefix[i])) for i in sorted(prompts.prefix))
    for i, n in prefix:
        for k, v in prompts.prefix[i]:
            tensors += [k, v]
    return (len(prompts.tokens), deep, prefix, prompts.pool), tensors


def _unflatten(layout: tuple[Any, ...], tensors: tuple[torch.Tensor, ...]) -> Prompts | None:
    if layout == ("none",):
        return None
    n_tokens, deep, prefix, pool = layout
    it = iter(tensors)
    prompts = Prompts(pool=pool)
    prompts.tokens = [next(it) for _ in range(n_tokens)]
    prompts.deep = {i: next(it) for i in deep}
    prompts.prefix = {i: [(next(it), next(it)) for _ in range(n)] for i, n in prefix}
    return prompts


def _run_prompted(backbone: Any, layout: tuple[Any, ...], x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """The eager prompted forward on flattened prompts: what ``torch.compile`` traces."""
    return backbone.forward_tokens_eager(x, _unflatten(layout, tensors))


class PromptedCompile:
    """``torch.compile`` of one backbone's prompted forward, cached by prompt layout.

    Args:
        backbone: a :class:`~driftprompt.engine.backbones.ViTBackbone`.
        backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` or ``"eager"``
            trace and run the graph without generating code, which tests use on the CPU).
        mode: ``torch.compile`` mode; ``"reduce-overhead"`` replays CUDA graphs.
        compile_after: the pass of a layout that compiles it (earlier passes run eager), so
            that a shape met once, such as the shorter last batch of a test split evaluated
            once, costs no compilation.
    """

    def __init__(self, backbone: Any, backend: str = "inductor", mode: str | None = None, compile_after: int = COMPILE_AFTER) -> None:
        self.backbone = backbone
        self.backend = backend
        self.mode = mode
        self.compile_after = max(1, int(compile_after))
        self.graphs: dict[tuple[Any, ...], Callable[..., torch.Tensor]] = {}
        self.passes: dict[tuple[Any, ...], int] = {}  # eager passes of layouts not compiled yet
        self.failed: str | None = None  # the cause, once compilation has failed
        self._full = False
        self._modules = list(backbone.modules())
        # every layout is one more guarded entry on the same traced function
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        if getattr(torch._dynamo.config, limit) < MAX_GRAPHS:
            setattr(torch._dynamo.config, limit, MAX_GRAPHS)
        if getattr(torch._dynamo.config, "accumulated_cache_size_limit", MAX_GRAPHS * 8) < MAX_GRAPHS * 8:
            torch._dynamo.config.accumulated_cache_size_limit = MAX_GRAPHS * 8

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # a copied backbone runs eager: compiled graphs belong to the original

    def key(self, x: torch.Tensor, layout: tuple[Any, ...], tensors: list[torch.Tensor]) -> tuple[Any, ...]:
        dev = x.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        shapes = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors)
        return (layout, tuple(x.shape), x.dtype, str(x.device), torch.is_grad_enabled(), torch.is_inference_mode_enabled(), amp, shapes)

    def hooked(self) -> bool:
        """Whether a module hook is attached (a projection strategy collecting statistics).

        Dynamo does not guard on hooks added after a graph was compiled (it would skip them),
        so a pass with hooks runs eager.
        """
        from .query_cache import has_forward_hooks

        return has_forward_hooks(self._modules)

    def __call__(self, x: torch.Tensor, prompts: Prompts | None) -> torch.Tensor:
        eager = self.backbone.forward_tokens_eager
        if self.failed is not None or self.hooked():
            return eager(x, prompts)
        layout, tensors = _flatten(prompts)
        key = self.key(x, layout, tensors)
        fn = self.graphs.get(key)
        try:
            if fn is None:
                seen = self.passes[key] = self.passes.get(key, 0) + 1
                if seen < self.compile_after:
                    return eager(x, prompts)
                if len(self.graphs) >= MAX_GRAPHS:
                    if not self._full:
                        self._full = True
                        log.info("%d prompt layouts compiled; further layouts run eager.", MAX_GRAPHS)
                    return eager(x, prompts)
                fn = torch.compile(_run_prompted, backend=self.backend, mode=self.mode, dynamic=False)
                self.graphs[key] = fn
            return fn(self.backbone, layout, x, *tensors)
        except DriftpromptError:
            raise  # a user's mistake (e.g. deep prompts of two lengths): the eager message stands
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back the same way
            out = eager(x, prompts)  # if eager fails too, that error is the real one
            self.fail(exc)
            return out

    def fail(self, exc: BaseException) -> None:
        """Run eager from now on, with one warning naming the cause."""
        from .errors import load_error_cause

        self.failed = load_error_cause(exc)
        self.graphs.clear()
        message = f"torch.compile of the prompted backbone failed ({self.failed}); running eager instead. Set train.compile: false to skip compilation."
        log.warning(message)


def compile_backbone(backbone: Any, backend: str = "inductor", mode: str | None = None, compile_after: int = COMPILE_AFTER) -> bool:
    """Route ``backbone.forward_tokens`` through :class:`PromptedCompile`; ``False`` if it cannot be.

    Only backbones with an eager prompted forward (``forward_tokens_eager``, the timm ViT
    wrapper) are compiled; where ``torch.compile`` is missing the backbone stays eager with
    one warning.
    """
    if not hasattr(backbone, "forward_tokens_eager"):
        return False
    compiled = PromptedCompile(backbone, backend, mode, compile_after)
    if not hasattr(torch, "compile"):
        compiled.fail(RuntimeError("this PyTorch has no torch.compile"))
        return False
    backbone.compiled_forward = compiled
    return True


def wants(option: Any, device: torch.device) -> bool:
    """``True``/``False`` as given; ``"auto"`` means on CUDA only."""
    return device.type == "cuda" if option == "auto" else bool(option)


def prepare_step(state: Any, config: Any, dataset: Any = None) -> None:
    """Apply ``train.compile`` (once per backbone) and ``train.data_on_device`` (once per dataset).

    Cheap to call every step: both decisions are remembered on the objects they apply to.
    """
    train = getattr(config, "train", None)
    if train is None:
        return
    backbone = state.backbone
    if backbone is not None and not getattr(backbone, "_compile_decided", False):
        backbone._compile_decided = True
        if wants(getattr(train, "compile", False), state.device):
            mode = "reduce-overhead" if getattr(train, "cuda_graphs", False) and state.device.type == "cuda" else None
            if compile_backbone(backbone, getattr(train, "compile_backend", "inductor"), mode):
                log.info("Compiling the prompted backbone (backend %s%s): the first steps of each prompt layout take longer.", backbone.compiled_forward.backend, f", mode {mode}" if mode else "")
    if dataset is not None and wants(getattr(train, "data_on_device", False), state.device):
        make_resident(dataset, state.device)


RESIDENT_SHARE = 0.25  # at most this share of the device's free memory goes to one dataset


def make_resident(dataset: Any, device: torch.device) -> bool:
    """Keep an in-memory dataset on ``device`` (see ``TensorImageDataset.to_device``), once.

    A dataset larger than ``RESIDENT_SHARE`` of the device's free memory stays on the host,
    with one INFO line, and its batches are copied per step as before.
    """
    to_device = getattr(dataset, "to_device", None)
    if to_device is None or getattr(dataset, "_resident_refused", False):
        return False
    if getattr(dataset, "resident", None) is not None:
        to_device(device)  # a no-op once there
        return True
    if device.type == "cuda":
        size = dataset.images.numel() * dataset.images.element_size()
        free, _ = torch.cuda.mem_get_info(device)
        if size > RESIDENT_SHARE * free:
            dataset._resident_refused = True
            log.info("A dataset of %.0f MiB stays on the host (over %d%% of the device's free memory); its batches are copied per step.", size / 2**20, RESIDENT_SHARE * 100)
            return False
    to_device(device)
    return True
