"""DynaPrompt: Dynamic Test-Time Prompt Tuning (Xiao et al., ICLR 2025) on a frozen CLIP.

An online buffer of text prompts persists across test samples. Its size defaults to 12, the
value the official run script passes (zzzx1224/DynaPrompt run_dynap.sh:5, ``num_p=12``, given to
``dynap_classification.py --num_prompts`` by scripts/test_dynap.sh:21): the strategy runs what
the reference code runs; ``buffer_size: 10`` gives the paper's smaller buffer. Each prompt is
stored as a residual over the initial context ("a photo of a", 4 vectors): prompt ``i`` is
``init + delta_i``; a fresh prompt has ``delta_i = 0``. For every sample, with the 64 TPT views:

* **prediction entropy** of prompt ``i``: the mean over all views of the entropy of that view's
  prediction, ``mean_v H(softmax(l_{v,i}))`` (official code: ``entropy(p_pred).mean(0)``);
* **probability difference** of prompt ``i``: the mean over the augmented views of the
  original view's maximum logit minus the view's own maximum logit,
  ``mean_{v>0} (max_c l_{0,i,c} - max_c l_{v,i,c})`` (official: ``plpd``). The paper words
  this as a difference of prediction *probabilities* between the original and augmented
  views; the official code uses CLIP's scaled *logits* and each view's own arg-max class,
  which is what is implemented here.

Selection (official code): the reference is the unused prompt at the head of the
least-recently-used order (always a fresh, initial prompt). Let ``k`` be the number of
prompts whose entropy is above the reference's. The selected prompts are those whose entropy
is below the reference's *and* that are among the ``k`` prompts with the largest probability
difference, plus the reference prompt itself. (The paper says "probability difference larger
than the initial prompt's"; the code's top-``k`` rule is used. The official code also indexes
the entropy ranking with prompt ids when it gathers the intersection,
``ent_order[alllist]`` at dynap_classification.py:130, which permutes the selected ids; the
intended prompt ids are used by default, and ``reference_indexing: true`` reproduces the
official indexing exactly.) With ``initial="when_empty"`` the fresh
prompt is used only when no buffered prompt is selected, as the paper describes appending.

Buffer rules: selected prompts move to the end of the LRU order and their use counts grow.
Before a sample, when every prompt has been used, the least recently used one is deleted and
a fresh prompt takes its slot (residual and use count set to zero): the official
"All prompts are used, reset prompt" rule. The optimizer (AdamW, lr 5e-3) is rebuilt for every
sample while the prompts persist. The loss is TPT's over the selected prompts: confident views
(10%, by the entropy averaged over the selected prompts), the ``avg_entropy`` of each selected
prompt's views, averaged over prompts. The prediction is the mean of the selected prompts'
logits on the original view.

Batches (``per_sample``). The buffer is sequential by nature: a sample's prompt selection reads
the buffer (residuals, use counts, LRU order) as the previous sample's update left it, and the
update changes every nonzero prompt (AdamW's decoupled weight decay acts on the whole buffer
tensor). The official code runs one sample at a time: its loader's batch is one image
(dynap_classification.py:256, 312-315), and for each sample it recycles a slot (394-400),
reloads the optimizer state (402), then selects and steps (``test_time_tuning``, 95-163).
So with ``per_sample: true`` and a test-time batch of B > 1 samples, the loop runs the samples
one after the other (the strategy declares ``sequential_samples``), and only what does not
read the buffer is done once for the batch: the views of all B samples (drawn in sample
order from the one generator, so they are the views one at a time would draw) and their
image features, B x V views in one pass of the image tower. Scoring every prompt, the
selection, the gradient step and the prediction stay per sample, on the buffer as it
stands: the results equal one-at-a-time runs within fp32 rounding. With ``per_sample:
false`` (the default) a batch is one adaptation unit: one selection from the batch-averaged
scores, one step, the mean loss over its samples.

Memory: selection only needs detached predictions, so all prompts are encoded without a graph,
``chunk_size`` sequences at a time; gradients flow only through the selected prompts, whose
text encoding is checkpointed per chunk. See docs/test-time.md for the ViT-B/16 estimate.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from driftprompt.engine import ConfigError, State, hookimpl
from driftprompt.engine.clip import clip_logits
from driftprompt.engine.loop import mask_logits

from .tpt import CLIPTestTimeBase, OnlineMonitor, allowed_mask, avg_entropy, entropy, make_views, raw_images, select_confident

NAME = "dynaprompt"
INITIAL_MODES = ("always", "when_empty")


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are the same, with ``cuda`` read as the current CUDA device.

    ``torch.device("cuda") != torch.device("cuda:0")`` although both name one GPU; comparing
    them naively would rebuild the prompt buffer on every hook call.
    """
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index or a.index is None or b.index is None


def prompt_scores(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction entropy and probability difference per prompt from (V, P, C) view logits.

    View 0 is the original image. Returns ``(entropy (P,), difference (P,))`` as defined in
    the module docstring.
    """
    ent = entropy(logits).mean(dim=0)
    top = logits.float().max(dim=-1).values  # V, P
    diff = (top[0:1] - top[1:]).mean(dim=0) if logits.shape[0] > 1 else torch.zeros_like(ent)
    return ent, diff


def select_prompts(ent: torch.Tensor, diff: torch.Tensor, reference: int, initial: str = "always", reference_indexing: bool = False) -> list[int]:
    """Prompt ids selected for a sample (official DynaPrompt rule; see the module docstring).

    ``reference_indexing`` reproduces the official gather ``ent_order[alllist]``
    (dynap_classification.py:126-130): the intersection's prompt ids are used as positions in
    the entropy ranking.
    """
    P = ent.shape[0]
    by_entropy = torch.argsort(ent, descending=True, stable=True).tolist()
    pos = by_entropy.index(reference)
    lower = set(by_entropy[min(pos + 1, P - 1) :])
    by_diff = set(torch.argsort(diff, descending=True, stable=True)[:pos].tolist())
    inter = sorted(lower & by_diff)
    if reference_indexing:
        if not inter:
            return [reference]
        return [by_entropy[i] for i in inter] + [reference]
    chosen = sorted(set(inter) - {reference})
    if initial == "when_empty" and chosen:
        return chosen
    return chosen + [reference]


class PromptBuffer:
    """Residual prompts with use counts and a least-recently-used order (official rules)."""

    def __init__(self, size: int, n_ctx: int, width: int, device: torch.device) -> None:
        self.delta = torch.zeros(size, n_ctx, width, device=device, requires_grad=True)
        self.uses = [0] * size
        self.order = list(range(size))  # least recently used first
        self.deleted = 0

    def begin_sample(self) -> int:
        """Recycle the least recently used prompt when all are used; returns the reference id."""
        if 0 not in self.uses:
            slot = self.order[0]
            self.uses[slot] = 0
            with torch.no_grad():
                self.delta[slot].zero_()
            self.deleted += 1
        return self.order[0]

    def mark_used(self, ids: Sequence[int]) -> None:
        for i in ids:
            self.order.remove(i)
            self.order.append(i)
            self.uses[i] += 1

    def clear(self) -> None:
        with torch.no_grad():
            self.delta.zero_()
        self.uses = [0] * len(self.uses)
        self.order = list(range(len(self.uses)))


class DynaPrompt(CLIPTestTimeBase):
    """Online buffer of CLIP text prompts selected per sample by entropy and probability difference.

    Args:
        class_names, clip, n_ctx, ctx_init, views, selection, augmix, lr, seed: as ``tpt``.
        buffer_size: prompts in the online buffer (12: the official run script's ``num_p``,
            run_dynap.sh:5; the paper's text uses 10).
        initial: ``"always"`` (official code: the fresh prompt is always selected) or
            ``"when_empty"`` (the paper: a fresh prompt only when no buffered prompt fits).
        chunk_size: text sequences (prompts x classes) encoded at a time (1000).
        reference_indexing: reproduce the official code's ``ent_order[alllist]`` indexing of
            the selected prompts (False: the intended prompt ids).
        collapse_window, collapse_fraction: the collapse guard (see ``OnlineMonitor``);
            a collapse clears the buffer back to the initial prompt. ``0`` disables it.
        per_sample: adapt the samples of a test-time batch one after the other, exactly as
            one at a time, with their views and image features computed once per batch
            (True); False treats a batch as one sample (shared selection and step).
    """

    name = NAME

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        clip: dict[str, Any] | None = None,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        views: int = 64,
        selection: float = 0.1,
        augmix: bool = False,
        lr: float = 5e-3,
        buffer_size: int = 12,
        initial: str = "always",
        chunk_size: int = 1000,
        reference_indexing: bool = False,
        collapse_window: int = 64,
        collapse_fraction: float = 0.1,
        per_sample: bool = False,
        seed: int = 0,
    ) -> None:
        if initial not in INITIAL_MODES:
            raise ConfigError(f"dynaprompt option 'initial' must be one of {INITIAL_MODES}, got {initial!r}.")
        if buffer_size < 1 or views < 1 or chunk_size < 1:
            raise ConfigError("dynaprompt needs buffer_size, views and chunk_size >= 1.")
        super().__init__(class_names, clip, n_ctx, ctx_init, seed)
        self.views, self.selection, self.augmix, self.lr = views, selection, augmix, lr
        self.buffer_size, self.initial, self.chunk_size = buffer_size, initial, chunk_size
        self.reference_indexing = bool(reference_indexing)
        self.rebuilds = 0  # buffer (re)allocations: one per device the run moves to
        self.buffer: PromptBuffer | None = None
        self.selected: list[int] = []
        self.view_features: torch.Tensor | None = None
        self.view_idx: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.monitor = OnlineMonitor(collapse_window, collapse_fraction)
        self.per_sample = bool(per_sample)
        self.batch_views: tuple[Any, int, torch.Tensor] | None = None  # (batch raw list, first position, (n, V, E) features)

    @property
    def sequential_samples(self) -> bool:
        """Whether the loop should run the samples of a batch one after the other."""
        return self.per_sample

    def _view_features(self, state: State) -> torch.Tensor:
        """(B, V, E) view features of this sample (or batch); per batch when the loop splits it."""
        assert self.clip is not None
        batch = state.batch if isinstance(state.batch, dict) else {}
        raw_batch = batch.get("batch_raw") if self.per_sample else None
        if raw_batch is None:
            views = make_views(raw_images(state), self.views, self.generator, self.clip, self.augmix)
            B, V = views.shape[:2]
            return self.image_features(state, views.flatten(0, 1)).view(B, V, -1)
        pos = int(batch.get("batch_position", 0))
        cached = self.batch_views
        if cached is None or cached[0] is not raw_batch or not cached[1] <= pos < cached[1] + cached[2].shape[0]:
            # the views of this sample and of the rest of the batch, in sample order: the draws one at a time would make
            views = make_views(list(raw_batch[pos:]), self.views, self.generator, self.clip, self.augmix)
            B, V = views.shape[:2]
            self.batch_views = cached = (raw_batch, pos, self.image_features(state, views.flatten(0, 1)).view(B, V, -1))
        feats = cached[2][pos - cached[1]].unsqueeze(0)
        if pos - cached[1] == cached[2].shape[0] - 1:
            self.batch_views = None  # the batch's last sample: nothing left to reuse
        return feats

    def _ensure(self, state: State) -> None:
        clip = self.setup(state)
        if self.buffer is None or not same_device(self.buffer.delta.device, state.device):
            old = self.buffer
            self.rebuilds += 1
            self.buffer = PromptBuffer(self.buffer_size, self.n_ctx, clip.text_width, state.device)
            if old is not None:
                with torch.no_grad():
                    self.buffer.delta.copy_(old.delta.to(state.device))
                self.buffer.uses, self.buffer.order = old.uses, old.order

    def prompts(self, ids: Sequence[int]) -> torch.Tensor:
        assert self.buffer is not None and self.init_ctx is not None
        return self.init_ctx.unsqueeze(0) + self.buffer.delta[list(ids)]

    def logits_for(self, ids: Sequence[int], state: State, grad: bool) -> torch.Tensor:
        """(B, V, len(ids), C) logits of every view under the given prompts."""
        assert self.clip is not None and self.token_ids is not None and self.view_features is not None
        with torch.set_grad_enabled(grad):
            text = self.clip.encode_text_with_context(self.prompts(ids), self.token_ids, chunk_size=self.chunk_size, recompute=grad)
            logits = torch.stack([clip_logits(f, text, self.clip.logit_scale) for f in self.view_features])
        allowed = allowed_mask(state, logits.shape[-1])
        return logits if allowed is None else mask_logits(logits, allowed)

    def reset(self) -> None:
        """Clear the buffer: every prompt back to the initial context."""
        if self.buffer is not None:
            self.buffer.clear()

    @hookimpl
    def test_stream_start(self, state: State) -> None:
        self._ensure(state)

    @hookimpl
    def test_sample_start(self, state: State) -> None:
        """Recycle a slot if needed, compute the views' features, select the prompts."""
        self._ensure(state)
        assert self.clip is not None and self.buffer is not None
        self.monitor.start()
        self.view_features = self._view_features(state)
        B = self.view_features.shape[0]
        reference = self.buffer.begin_sample()
        with torch.no_grad():
            logits = self.logits_for(range(self.buffer_size), state, grad=False)  # B, V, P, C
        ent, diff = prompt_scores(logits.mean(dim=0) if B > 1 else logits[0])
        self.selected = select_prompts(ent, diff, reference, self.initial, self.reference_indexing)
        self.buffer.mark_used(self.selected)
        self.view_idx = None

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        if state.phase != "adapt" or self.buffer is None:
            return None
        return [{"params": [self.buffer.delta], "name": f"{NAME}.prompts", "role": "prompt", "lr": self.lr}]

    @hookimpl
    def forward(self, state: State) -> torch.Tensor | None:
        """Mean logits of the selected prompts on the original view; the loss in "adapt"."""
        if state.phase not in ("adapt", "predict") or self.view_features is None:
            return None
        logits = self.logits_for(self.selected, state, grad=state.phase == "adapt")  # B, V, S, C
        if state.phase == "adapt":
            if self.view_idx is None:
                self.view_idx = torch.stack([select_confident(row.detach(), self.selection)[1] for row in logits])
            self.loss = torch.stack([avg_entropy(row[idx]).mean() for row, idx in zip(logits, self.view_idx)]).mean()
        return logits[:, 0].mean(dim=1)

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "adapt" or self.loss is None:
            return None
        return {f"{NAME}_entropy": self.loss}

    @hookimpl
    def test_sample_end(self, state: State) -> None:
        self.loss = None
        if state.logits is not None and self.monitor.record(state.logits, state.targets):
            self.reset()
        state.metrics[f"{NAME}/collapse_resets"] = self.monitor.resets  # the loop logs each new reset

    @hookimpl
    def test_stream_end(self, state: State) -> None:
        self.monitor.publish(state, NAME)
        if self.buffer is not None:
            state.metrics[NAME]["deleted_prompts"] = self.buffer.deleted

    def state_dict(self) -> dict[str, Any]:
        if self.buffer is None:
            return {}
        return {"delta": self.buffer.delta.detach().cpu(), "uses": list(self.buffer.uses), "order": list(self.buffer.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        delta = state["delta"]
        self.buffer = PromptBuffer(delta.shape[0], delta.shape[1], delta.shape[2], delta.device)
        with torch.no_grad():
            self.buffer.delta.copy_(delta)
        self.buffer.uses, self.buffer.order = list(state["uses"]), list(state["order"])


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register(NAME, DynaPrompt)
