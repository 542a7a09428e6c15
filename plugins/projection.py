"""Shared maths and plumbing of the projection strategies (``pgp``, ``nsp``).

Gradient projection keeps a model's outputs on old data unchanged by restricting how trainable
parameters may move. Two families are implemented on top of this module:

* GPM (Saha et al., ICLR 2021, "Gradient Projection Memory for Continual Learning"): after each
  task, keep an orthonormal basis U of the subspace that the task's representations span
  (as much of it as the energy threshold epsilon asks for), and remove from later gradients
  their component inside it: g <- g - g U U^T. PGP (Qiao et al., ICLR 2024) applies it to
  prompts; :func:`gpm_extend` is GPM's basis construction and incremental update.
* NSP (Lu et al., NeurIPS 2024): project the optimizer's update into the approximate null space
  of uncentered feature covariances, the boundary of that null space chosen by an elbow rule on
  the singular values (:func:`elbow_index`, :func:`null_space_projector`).

Nothing here names a strategy. The strategies find what to project from the parameter groups
that other strategies declare (``role`` and ``layer``), and read layer representations from the
training forward passes through :class:`WindowCollector`, which hooks the ``norm1`` module of
the blocks it is asked about: that module runs in both of the backbone's block paths (plain
tokens and attention prefixes), so its input is the block's input token stream and its output
the tokens the attention projects.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable

import torch
from driftprompt.engine import hookimpl

log = logging.getLogger(__name__)
from torch import nn

# --- energy-threshold bases (GPM) ---------------------------------------------------------


def energy_rank(energies: torch.Tensor, threshold: float, total: float | None = None, kept: float = 0.0) -> int:
    """Smallest k with (kept + sum of the k largest ``energies``) >= threshold * total.

    ``energies`` are squared singular values of a representation matrix (eigenvalues of its
    Gram matrix), sorted in decreasing order; ``total`` defaults to their sum and ``kept`` is
    the energy that an existing basis already captures (GPM's incremental criterion). Returns 0
    when ``kept`` alone passes the threshold.
    """
    energies = energies.double().clamp_min(0.0)
    total = float(energies.sum()) if total is None else float(total)
    if total <= 0.0:
        return 0
    need = threshold * total - kept
    if need <= 1e-12 * total:
        return 0
    cumulative = torch.cumsum(energies, 0)
    # a tiny relative tolerance, so that a threshold met exactly (by hand-built spectra) counts
    hits = (cumulative >= need - 1e-9 * total).nonzero()
    return int(hits[0]) + 1 if len(hits) else int(energies.numel())


def _eigh_desc(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (decreasing) and eigenvectors (columns) of a symmetric matrix, in float64."""
    values, vectors = torch.linalg.eigh(gram.double())
    return values.flip(0).clamp_min(0.0), vectors.flip(1)


def gpm_extend(gram: torch.Tensor, basis: torch.Tensor | None, threshold: float, first_off_by_one: bool = False) -> torch.Tensor:
    """GPM's basis after one more task, from the Gram matrix ``gram`` = R R^T of its representation R.

    First task (``basis`` is ``None``): the top-k left singular vectors of R, with the smallest k
    such that ||R_k||_F^2 >= threshold * ||R||_F^2. Later tasks: the residual
    R_hat = R - U U^T R is decomposed, and its top directions are appended while the energy
    captured by the old basis plus the new directions stays below threshold * ||R||_F^2
    (GPM, Section 4, "incremental update"); if the old basis already captures enough, nothing
    is added. Works on the Gram matrix, so R may have any number of columns (tokens).

    ``first_off_by_one`` reproduces the public GPM/PGP code for the first task, which keeps the
    number of components whose cumulative ratio is still *below* the threshold (one fewer than
    the paper's criterion when it is not met exactly).

    Returns an orthonormal (d, k) float32 basis on ``gram``'s device (k may be 0).
    """
    d = gram.shape[0]
    device = gram.device
    gram = gram.double()
    total = float(torch.trace(gram))
    if basis is None or basis.shape[1] == 0:
        energies, vectors = _eigh_desc(gram)
        if first_off_by_one:
            k = int((torch.cumsum(energies, 0) / max(total, 1e-300) < threshold).sum()) if total > 0 else 0
        else:
            k = energy_rank(energies, threshold, total)
        return vectors[:, :k].float().to(device)
    u = basis.double().to(gram.device)
    residual_projector = torch.eye(d, dtype=gram.dtype, device=gram.device) - u @ u.T
    residual = residual_projector @ gram @ residual_projector
    kept = total - float(torch.trace(residual))
    energies, vectors = _eigh_desc(residual)
    k = energy_rank(energies, threshold, total, kept)
    if k == 0:
        return basis.float().to(device)
    fresh = vectors[:, :k]
    # the residual's eigenvectors are orthogonal to u up to rounding; re-orthonormalise
    fresh = fresh - u @ (u.T @ fresh)
    fresh, _ = torch.linalg.qr(fresh)
    merged = torch.cat([u, fresh], dim=1)[:, :d]
    return merged.float().to(device)


def orthonormal_span(vectors: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis (d, r) of the column span of ``vectors``, dropping near-null directions."""
    if vectors.numel() == 0 or vectors.shape[1] == 0:
        return vectors.new_zeros(vectors.shape[0], 0)
    u, s, _ = torch.linalg.svd(vectors.double(), full_matrices=False)
    keep = s > tolerance * max(float(s.max()), 1.0)
    return u[:, keep].to(vectors.dtype)


def block_projector(bases: list[torch.Tensor]) -> torch.Tensor:
    """The (D, D) orthogonal projector onto the blocks' bases, block-diagonal over channel groups.

    ``bases[h]`` is an orthonormal (D_h, k_h) basis of channel block h (one block of width D for
    plain token memories; one block per attention head for query memories).
    """
    blocks = [b.double() @ b.double().T for b in bases]
    return torch.block_diag(*blocks).float()


def remove_component(x: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """x - x P along the last (channel) axis: GPM's g <- g - g U U^T with P = U U^T."""
    return x - (x.reshape(-1, x.shape[-1]).to(projector.dtype) @ projector).reshape(x.shape).to(x.dtype)


# --- null spaces (NSP) --------------------------------------------------------------------


def elbow_index(singular_values: torch.Tensor) -> int:
    """First index of the null space by the elbow of a decreasing singular-value curve.

    The rule of the NSP reference code ("adaptive" threshold): the elbow is where the discrete
    second difference s[i] - 2 s[i+1] + s[i+2] is largest, i.e. where the curve bends most
    sharply from steep to flat. Curves of 128 values or more are first smoothed with a Gaussian
    filter (sigma 10) and 1.5 % of the second differences are ignored at either end, as in that
    code. The singular value at the elbow, s*, is the threshold; the null space starts at the
    last index whose value is still >= s* (so it contains that direction and every smaller one).
    """
    s = singular_values.double().flatten().cpu()
    n = s.numel()
    if n < 3:
        return n - 1
    if n >= 128:
        radius = 40  # 4 sigma
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / 10.0) ** 2)
        kernel = kernel / kernel.sum()
        padded = torch.cat([s[:1].repeat(radius), s, s[-1:].repeat(radius)])  # "nearest" borders
        smooth = torch.nn.functional.conv1d(padded.view(1, 1, -1), kernel.view(1, 1, -1)).flatten()
        second = smooth[:-2] - 2 * smooth[1:-1] + smooth[2:]
        drop = int(n * 0.03 / 2)
        valid = second[drop : second.numel() - drop] if drop else second
        position = int(valid.argmax()) + (n - valid.numel()) // 2
    else:
        second = s[:-2] - 2 * s[1:-1] + s[2:]
        position = int(second.argmax()) + (n - second.numel()) // 2
    threshold = s[position]
    return int((s >= threshold).nonzero().max())


def null_space_projector(covariance: torch.Tensor, eta: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """eta * B + (1 - eta) * I, with B the projector onto the approximate null space of ``covariance``.

    The null space is spanned by the right singular vectors from :func:`elbow_index` on.
    ``normalize`` divides B by its Frobenius norm first, as the NSP reference code does (a
    rank-k projector then shrinks updates by 1/sqrt(k)); the paper writes the plain projector.
    """
    _, s, vh = torch.linalg.svd(covariance.double())
    start = elbow_index(s)
    null = vh[start:]  # (k, d) rows
    b = null.T @ null
    if normalize:
        b = b / b.norm().clamp_min(1e-12)
    eye = torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
    return (eta * b + (1.0 - eta) * eye).float()


# --- where a group's parameters enter the network -------------------------------------------


def group_layers(group: dict[str, Any]) -> list[int] | None:
    """The group's ``layer`` as a list (``None`` when it declares none)."""
    layer = group.get("layer")
    if layer is None:
        return None
    if isinstance(layer, (list, tuple)):
        return [int(i) for i in layer]
    return [int(layer)]


def per_layer_views(tensor: torch.Tensor, group: dict[str, Any]) -> list[tuple[int, Any]]:
    """(layer, index) pairs of a parameter: the whole tensor when ``layer`` is one block, else
    one slice of the leading axis per block when ``layer`` is a list (DualPrompt's convention)."""
    layers = group_layers(group)
    if layers is None:
        return [(0, ...)]
    if not isinstance(group.get("layer"), (list, tuple)):
        return [(layers[0], ...)]
    if tensor.dim() < 2 or tensor.shape[0] != len(layers):
        raise ValueError(f"a parameter of shape {tuple(tensor.shape)} declares layers {layers}; its leading axis must index them")
    return [(layer, j) for j, layer in enumerate(layers)]


def prefix_key_index(tensor: torch.Tensor, group: dict[str, Any]) -> list[tuple[int, Any]]:
    """(layer, index) pairs selecting the key half of a ``role: prefix`` parameter.

    A ``layer`` list means the leading axis indexes those blocks (as for every role). Then:

    * the group may name its key/value axis with ``"kv_axis": a`` (counted after the layer axis,
      if any): index 0 along it is the key;
    * otherwise, with a ``layer`` list the next axis separates keys (0) from values (1)
      (DualPrompt's layout, (layers, 2, ..., D));
    * with one block and no ``kv_axis``, a tensor shaped (..., L, D) holds L/2 key tokens then
      L/2 value tokens (CODA-Prompt's layout: prefix length L = L/2 keys + L/2 values).
    """
    kv_axis = group.get("kv_axis")
    out: list[tuple[int, Any]] = []
    for layer, index in per_layer_views(tensor, group):
        lead = () if index is Ellipsis else (index,)
        rest = tensor.dim() - len(lead)
        if kv_axis is not None:
            tail: list[Any] = [slice(None)] * rest
            tail[int(kv_axis)] = 0
            out.append((layer, lead + tuple(tail)))
        elif lead:
            if rest < 3 or tensor.shape[1] != 2:
                raise ValueError(f"a prefix parameter of shape {tuple(tensor.shape)} for layers {group.get('layer')} must be shaped (layers, 2, ..., D) or name its 'kv_axis'")
            out.append((layer, lead + (0,)))
        else:
            length = tensor.shape[-2]
            if length % 2:
                raise ValueError(f"a prefix parameter of shape {tuple(tensor.shape)} has an odd length; name its 'kv_axis' in the group")
            out.append((layer, (..., slice(0, length // 2), slice(None))))
    return out


# --- token layout --------------------------------------------------------------------------


def token_layout(prompts: Any, layer: int, num_prefix: int, length: int) -> dict[str, Any]:
    """Where each kind of token sits in the input of block ``layer`` of the engine's token stream.

    Returns ``image`` (a LongTensor of the class/register and patch positions), ``layer0``
    (slice of the layer-0 prompt tokens) and ``slot`` (slice of the deep-prompt slot, empty
    before the first block with deep prompts), following ``ViTBackbone.forward_tokens``.
    """
    n0 = prompts.num_tokens if prompts is not None else 0
    slot_len = 0
    if prompts is not None and prompts.deep:
        earlier = [d for d in sorted(prompts.deep) if d <= layer]
        if earlier:
            slot_len = prompts.deep[earlier[0]].shape[-2]
    start = num_prefix + n0
    image = torch.cat([torch.arange(num_prefix), torch.arange(start + slot_len, length)])
    return {"image": image, "layer0": slice(num_prefix, start), "slot": slice(start, start + slot_len)}


def prompt_positions(prompts: Any, layer: int, num_prefix: int, length: int) -> slice | None:
    """Positions of the prompt tokens that enter at block ``layer`` (deep slot, or layer-0 tokens)."""
    layout = token_layout(prompts, layer, num_prefix, length)
    if prompts is not None and layer in prompts.deep:
        return layout["slot"]
    if layer == 0 and layout["layer0"].stop > layout["layer0"].start:
        return layout["layer0"]
    return None


def attention_parts(block: nn.Module, h: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head queries (B, H, N, Dh), after ``q_norm``, and attention probabilities (B, H, N, Lp + N).

    ``h`` is the block's ``norm1`` output; ``prefix`` the (B, Lp, D) key/value prefixes of the
    block, if any (their keys enter the softmax in front of the tokens', as in the backbone).
    """
    attn = block.attn
    b, n, _ = h.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(h).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix is not None:
        pk = prefix[0].to(k.dtype).reshape(b, -1, heads, head_dim).transpose(1, 2)
        k = torch.cat([pk, k], dim=2)
    scores = (q.float() * head_dim**-0.5) @ k.float().transpose(-2, -1)
    return q.float(), scores.softmax(dim=-1)


def key_weight(block: nn.Module) -> torch.Tensor:
    """W_k of a timm block, shaped (H, Dh, D): the key rows of the fused qkv projection, per head."""
    attn = block.attn
    qkv = getattr(attn.qkv, "base", attn.qkv)  # an adapter wrapper keeps the frozen Linear as .base
    dim = qkv.weight.shape[1]
    return qkv.weight[dim : 2 * dim].detach().float().reshape(attn.num_heads, attn.head_dim, dim)


# --- reading representations from the training forward passes ------------------------------


class WindowCollector:
    """Hooks ``norm1`` of chosen blocks during the last training batches of each epoch.

    ``samples`` images are wanted: the collector is active for the last ceil(samples / batch)
    batches of the first and of the last planned epoch (``train.epochs``). The strategy resets
    its accumulators at each epoch start, so what remains at ``experience_end`` comes from the
    last planned epoch, with the prompts of the end of training; the first epoch's collection
    is the fallback for experiences that run a single pass (online streams, whatever
    ``train.epochs`` says) or stop early.
    The callback receives (state, layer, block input x, norm1 output h), detached. Passes run
    without autograd (the frozen query of ``compute_query()``) are ignored: only the prompted,
    differentiable training pass is read.
    """

    def __init__(self, samples: int) -> None:
        self.samples = int(samples)
        self.handles: list[Any] = []

    def active(self, state: Any) -> bool:
        if state.phase != "train" or state.experience is None:
            return False
        cfg = getattr(state, "config", None)
        if cfg is None:
            return True
        if state.epoch not in (0, int(cfg.train.epochs) - 1):
            return False
        batch = int(cfg.train.batch_size)
        per_epoch = math.ceil(len(state.experience.train) / batch)
        window = math.ceil(self.samples / batch)
        return state.batch_index >= per_epoch - window

    def attach(self, state: Any, layers: Iterable[int], callback: Callable[[Any, int, torch.Tensor, torch.Tensor], None]) -> None:
        self.detach()
        blocks = state.backbone.model.blocks
        for layer in sorted(set(layers)):

            def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor, layer: int = layer) -> None:
                if not torch.is_grad_enabled():  # the no-grad query pass (compute_query) is not the prompted pass
                    return
                with torch.no_grad():
                    callback(state, layer, args[0].detach(), output.detach())

            self.handles.append(blocks[layer].norm1.register_forward_hook(hook))

    def attach_inputs(self, modules: dict[Any, nn.Module], callback: Callable[[Any, Any, torch.Tensor], None], state: Any) -> None:
        """Also hook the inputs of arbitrary modules (adapter sites), keyed by ``modules``' keys."""
        for key, module in modules.items():

            def hook(module: nn.Module, args: tuple[torch.Tensor, ...], key: Any = key) -> None:
                if not torch.is_grad_enabled():
                    return
                with torch.no_grad():
                    callback(state, key, args[0].detach())

            self.handles.append(module.register_forward_pre_hook(hook))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def frozen_block_inputs(backbone: Any, inputs: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """Inputs of the chosen blocks in the backbone's own token stream (no prompts), without autograd."""
    wanted = sorted(set(layers))
    out: dict[int, torch.Tensor] = {}
    if not wanted:
        return out
    with torch.no_grad():
        x = backbone.embed(inputs)
        for i, block in enumerate(backbone.model.blocks[: wanted[-1] + 1]):
            if i in wanted:
                out[i] = x.detach()
            x = block(x)
    return out


# --- projecting the optimizer's update ------------------------------------------------------


class UpdateSnapshot:
    """Parameters before ``optimizer.step()``, to replace the step's update by a projected one.

    ``take`` copies the listed parameters (in ``before_optimizer_step``); ``apply`` calls
    ``fn(param, delta)`` for each and writes ``old + result`` back (in ``after_optimizer_step``).
    """

    def __init__(self) -> None:
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def take(self, params: Iterable[torch.Tensor]) -> None:
        self.saved = [(p, p.detach().clone()) for p in params]

    def apply(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        with torch.no_grad():
            for p, old in self.saved:
                delta = p.detach() - old
                p.copy_(old + fn(p, delta))
        self.saved = []


def optimizer_groups(state: Any) -> list[dict[str, Any]]:
    """The described parameter groups in force: the optimizer's (extra keys kept), else the declared ones."""
    if state.optimizer is not None:
        return list(state.optimizer.param_groups)
    return list(state.param_groups)


def reduce_statistics(state: Any, collected: dict[Any, Any]) -> dict[Any, Any]:
    """Combine per-process representation statistics under torchrun (a no-op in one process).

    Gram and covariance matrices are sums over samples, so they are summed over processes;
    lists of sampled rows (the sample-space variant) are concatenated in rank order. Keys are
    visited in sorted order so that every process issues the same collectives.
    """
    dist = state.dist
    if not dist.enabled:
        return collected
    out: dict[Any, Any] = {}
    for key in sorted(collected, key=str):
        value = collected[key]
        if torch.is_tensor(value):
            out[key] = dist.all_reduce_(value.clone(), "the projection-statistics reduction")
        else:
            parts = dist.all_gather_object([r.cpu() for r in value], "the projection-statistics gather")
            out[key] = [r.to(state.device) for part in parts for r in part]
    return out


class WindowedStatistics:
    """Event plumbing shared by the projection strategies (``pgp``, ``nsp``).

    Statistics accumulate per epoch in ``self._acc`` while ``self._collector`` (a
    :class:`WindowCollector`) is attached during a training batch; the last epoch that collected
    anything is kept in ``self._final`` for ``experience_end``. Subclasses provide
    ``_require(state)`` (the one-sentence check that there is something to project),
    ``batch_start`` (what to attach) and ``experience_end`` (what to build).
    """

    _acc: dict[Any, Any]
    _final: dict[Any, Any]
    _collector: WindowCollector
    _warned: bool = False

    def _require(self, state: Any) -> None:
        raise NotImplementedError

    @hookimpl
    def experience_start(self, state: Any) -> None:
        self._acc, self._final = {}, {}
        if state.optimizer is not None and state.phase == "train":
            self._require(state)

    @hookimpl
    def epoch_start(self, state: Any) -> None:
        self._acc = {}

    @hookimpl
    def batch_end(self, state: Any) -> None:
        self._collector.detach()

    @hookimpl
    def epoch_end(self, state: Any) -> None:
        if self._acc:
            self._final = self._acc

    def _end_collection(self, state: Any, name: str, hint: str) -> dict[Any, Any] | None:
        """Close the experience's collection window: the statistics, summed over processes.

        Returns ``None`` (after one warning per run) when nothing trained, so there is nothing
        to project.
        """
        self._collector.detach()
        if state.optimizer is None:
            if not self._warned:
                log.warning("%s: no strategy declared trainable parameters, so there is nothing to project; %s", name, hint)
                self._warned = True
            return None
        return reduce_statistics(state, self._final or self._acc)
