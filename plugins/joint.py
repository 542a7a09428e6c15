"""Joint training: the upper bound that continual strategies are compared against.

The ``joint`` stream wraps any continual stream and merges all of its experiences into one
(:func:`driftprompt.streams.scenarios.joint`): the model trains on every experience's data at
once, with every class known from the start, and is tested on the union of the test sets.
Train it with an ordinary classifier strategy (``finetune``, or a prompt strategy; a class
mask is then a no-op, since the one experience holds every class)::

    stream:
      name: joint
      options:
        stream: cifar100                       # the stream to merge
        options: {n_experiences: 10, seed: 0}  # its own options
    strategies: [finetune]

This is the "Joint" row of Avalanche (``JointTraining``) and mammoth (models/joint.py:26-66,
which keeps each task's data and trains on their union after the last task). Here the union
is one experience, so ``summary.json`` holds a 1 x 1 accuracy matrix: the final and average
incremental accuracy are both the accuracy on the union test set, and forgetting, BWT and FWT,
which need two experiences, are absent. When every experience of the wrapped stream has the
same number of test images (equal classes per experience and test images per class), that
accuracy equals the mean of the per-experience accuracies that the other strategies' final
accuracy averages; otherwise it weights experiences by their test size.

The wrapped stream is built through the installed plugins (entry points); streams from a
config's ``plugin_modules`` are not visible to it. The merged stream is offline: it trains
``train.epochs`` epochs even when the wrapped one is online.
"""

from __future__ import annotations

from typing import Any

from driftprompt.engine import ConfigError, StreamError, hookimpl


def joint_stream(stream: str = "synthetic", options: dict[str, Any] | None = None) -> Any:
    """Every experience of another stream merged into one: the joint-training upper bound.

    Args:
        stream: the registered name of the stream to merge.
        options: that stream's options, as under ``stream.options``.
    """
    from driftprompt.engine.plugins import discover, instantiate
    from driftprompt.streams.scenarios import joint

    if stream == "joint":
        raise ConfigError("The joint stream cannot wrap itself; set stream.options.stream to a continual stream such as cifar100.")
    entry = discover().stream(stream)
    inner = instantiate(entry, dict(options or {}), kind="stream")
    if hasattr(inner, "batches") or getattr(inner, "scenario", "") == "test_time" or not hasattr(inner, "experiences"):
        raise StreamError(f"Stream '{stream}' is not a continual stream, so it has no experiences to merge; wrap a continual stream such as cifar100.")
    return joint(inner)


@hookimpl
def register_streams(register):  # type: ignore[no-untyped-def]
    register("joint", joint_stream)
