"""The plugin contract: every hook a strategy may implement.

Hooks come in three kinds:

* event hooks, one per :class:`~driftprompt.engine.events.Event`, take ``state`` (and ``self``
  on a strategy object), mutate it and return ``None``;
* query hooks return values: ``forward`` (first non-``None`` result wins; the engine supplies
  the default, registered ``trylast``; wrap it with ``@hookimpl(wrapper=True)``),
  ``loss_terms`` and ``trainable_parameters`` (results of all strategies are collected);
* discovery hooks, implemented by the modules named in the ``driftprompt`` entry-point group:
  ``register_strategies`` and ``register_streams``.

A strategy implements only the hooks it needs. The reference with examples is docs/events.md.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "driftprompt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- event hooks -------------------------------------------------------------------------


@hookspec
def init(state: Any) -> None:
    """Once per process, before the first experience or test sample.

    Attach prompt modules to the backbone, create parameters, move them to ``state.device``.
    """


@hookspec
def fit_start(state: Any) -> None:
    """Before the first experience of a continual run (also after ``--resume``).
    """


@hookspec
def experience_start(state: Any) -> None:
    """A new experience begins; ``state.experience`` describes it.

    Grow heads, push a prompt queue, add prompt components. The optimizer is built right after this event from ``trainable_parameters``; a strategy may set ``state.optimizer`` here to supply its own.
    """


@hookspec
def epoch_start(state: Any) -> None:
    """Before each pass over the experience's training data.
    """


@hookspec
def batch_start(state: Any) -> None:
    """A training batch is in ``state.inputs`` / ``state.targets``.
    """


@hookspec
def before_forward(state: Any) -> None:
    """Before every forward pass, in every phase.

    Prompt strategies compute the query feature and select prompts here.
    """


@hookspec
def after_forward(state: Any) -> None:
    """After every forward pass; ``state.logits`` is set.
    """


@hookspec
def before_loss(state: Any) -> None:
    """Before ``loss_terms`` is collected.

    Mask logits (``state.logits``) here.
    """


@hookspec
def after_loss(state: Any) -> None:
    """``state.loss`` and ``state.loss_terms`` are set.
    """


@hookspec
def before_backward(state: Any) -> None:
    """Just before ``state.loss.backward()``.
    """


@hookspec
def after_backward(state: Any) -> None:
    """Gradients are populated.
    """


@hookspec
def before_optimizer_step(state: Any) -> None:
    """Just before ``optimizer.step()``; gradients may be edited in place.

    Gradient projection lives here.
    """


@hookspec
def after_optimizer_step(state: Any) -> None:
    """Just after ``optimizer.step()``.
    """


@hookspec
def batch_end(state: Any) -> None:
    """After each training batch; ``state.step`` has been incremented.
    """


@hookspec
def epoch_end(state: Any) -> None:
    """After each pass over the training data.
    """


@hookspec
def experience_end(state: Any) -> None:
    """Training on the experience is over, before its evaluation.

    Freeze keys, compute prototypes or projection bases, snapshot statistics.
    """


@hookspec
def eval_start(state: Any) -> None:
    """An evaluation round over every experience seen so far begins.
    """


@hookspec
def eval_batch_start(state: Any) -> None:
    """An evaluation batch is in ``state.inputs``; ``state.eval_experience`` names its experience.
    """


@hookspec
def eval_batch_end(state: Any) -> None:
    """After the forward pass of an evaluation batch.
    """


@hookspec
def eval_end(state: Any) -> None:
    """The evaluation round is over; ``state.metrics`` holds the new accuracy row.
    """


@hookspec
def fit_end(state: Any) -> None:
    """After the last experience of a continual run.
    """


@hookspec
def test_stream_start(state: Any) -> None:
    """Before the first sample of a test-time stream.
    """


@hookspec
def test_sample_start(state: Any) -> None:
    """A test sample (or batch) is in ``state.inputs``.

    Episodic reset or buffer lookup.
    """


@hookspec
def adapt_step_start(state: Any) -> None:
    """Before each adaptation step on the current test sample (``state.phase == 'adapt'``).
    """


@hookspec
def adapt_step_end(state: Any) -> None:
    """After each adaptation step.
    """


@hookspec
def test_sample_end(state: Any) -> None:
    """After the prediction on the current test sample; ``state.logits`` holds it.

    Buffer append or delete, online metrics.
    """


@hookspec
def test_stream_end(state: Any) -> None:
    """After the last sample of a test-time stream.
    """


# --- query hooks -------------------------------------------------------------------------


@hookspec(firstresult=True)
def forward(state: Any) -> Any:
    """Compute the logits for ``state.inputs`` and return them.

    The engine's default (registered ``trylast``) runs the frozen backbone with whatever
    prompts strategies placed in ``state.prompts``, stores ``state.features`` and returns
    ``state.head(state.features)``. A strategy that classifies differently (nearest class mean,
    a CLIP text head) returns its own logits; the first non-``None`` result wins. A wrapper
    (``@hookimpl(wrapper=True)``) receives the result of the inner implementations from its
    ``yield`` and returns the (possibly changed) result.
    """


@hookspec
def loss_terms(state: Any) -> dict[str, Any] | None:
    """Return named loss terms for the current batch, or ``None``.

    Terms from every strategy are collected into ``state.loss_terms`` and summed into
    ``state.loss``. Two strategies returning the same name is an error.
    """


@hookspec
def trainable_parameters(state: Any) -> list[Any] | None:
    """Return the parameters this strategy trains in the current experience or test sample.

    Items are tensors, or dicts ``{"params": [...], "name": str, "role": str, "layer": int,
    **optimizer_options}`` describing a parameter group; ``role`` (``"head"``, ``"prompt"``,
    ``"key"``, ``"prefix_key"``, ``"prefix_value"``, ``"adapter"``) and ``layer`` let gradient
    projection act on other strategies' parameters without naming them.
    """


# --- discovery hooks ---------------------------------------------------------------------


@hookspec
def register_strategies(register: Callable[..., None]) -> None:
    """Announce strategy classes: call ``register(name, cls)`` once per strategy."""


@hookspec
def register_streams(register: Callable[..., None]) -> None:
    """Announce stream builders: call ``register(name, builder)`` once per stream."""


EVENT_HOOKS: tuple[str, ...] = (
    "init",
    "fit_start",
    "experience_start",
    "epoch_start",
    "batch_start",
    "before_forward",
    "after_forward",
    "before_loss",
    "after_loss",
    "before_backward",
    "after_backward",
    "before_optimizer_step",
    "after_optimizer_step",
    "batch_end",
    "epoch_end",
    "experience_end",
    "eval_start",
    "eval_batch_start",
    "eval_batch_end",
    "eval_end",
    "fit_end",
    "test_stream_start",
    "test_sample_start",
    "adapt_step_start",
    "adapt_step_end",
    "test_sample_end",
    "test_stream_end",
)
QUERY_HOOKS: tuple[str, ...] = ("forward", "loss_terms", "trainable_parameters")
DISCOVERY_HOOKS: tuple[str, ...] = ("register_strategies", "register_streams")
