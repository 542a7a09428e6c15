"""The named points of driftprompt's loops.

Each member's value is the name of the pluggy hook that fires at that point, so a strategy
implements ``def before_optimizer_step(self, state)`` and the engine calls it through
``Event.BEFORE_OPTIMIZER_STEP``.
"""

from __future__ import annotations

from enum import Enum


class Event(str, Enum):
    """Every point at which strategies are called, in the order the loops reach them.

    Continual loop (``engine.loop.ContinualLoop.fit``)::

        init                                    once per process, before anything else
        fit_start
        for experience in stream[start:]:      start > 0 after --resume
            experience_start                    new classes are in state.experience.classes;
                                                the optimizer is built right after this event
            for epoch in range(epochs):
                epoch_start
                for batch in experience.train:
                    batch_start
                    before_forward
                    forward                     query hook: returns logits (wrappable)
                    after_forward
                    before_loss
                    loss_terms                  query hook: named loss terms, summed
                    after_loss
                    before_backward
                    loss.backward()
                    after_backward
                    before_optimizer_step       gradient projection lives here
                    optimizer.step()
                    after_optimizer_step
                    batch_end
                epoch_end
            experience_end                      freeze keys, snapshot statistics, prototypes
            eval_start                          over every experience seen so far
                for batch in each seen experience's test set:
                    eval_batch_start
                    before_forward / forward / after_forward
                    eval_batch_end
            eval_end                            state.metrics holds the new accuracy row
            (checkpoint written atomically)
        fit_end

    Test-time loop (``engine.loop.TestTimeLoop.run``)::

        init
        test_stream_start
        for sample in test stream:              one image, or one batch for batch-wise streams
            test_sample_start                   episodic reset or buffer lookup
            for step in range(adapt_steps):     state.phase == "adapt"
                adapt_step_start
                before_forward / forward / after_forward
                before_loss / loss_terms / after_loss
                before_backward / backward / after_backward
                before_optimizer_step / step / after_optimizer_step
                adapt_step_end
            before_forward / forward / after_forward   state.phase == "predict"
            test_sample_end                     buffer append or delete, online metrics
        test_stream_end

    ``before_forward``, ``forward`` and ``after_forward`` fire around every forward pass in
    every phase; strategies read ``state.phase`` ("train", "eval", "adapt", "predict") when
    they must behave differently.
    """

    INIT = "init"
    FIT_START = "fit_start"
    EXPERIENCE_START = "experience_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    BEFORE_FORWARD = "before_forward"
    AFTER_FORWARD = "after_forward"
    BEFORE_LOSS = "before_loss"
    AFTER_LOSS = "after_loss"
    BEFORE_BACKWARD = "before_backward"
    AFTER_BACKWARD = "after_backward"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    AFTER_OPTIMIZER_STEP = "after_optimizer_step"
    BATCH_END = "batch_end"
    EPOCH_END = "epoch_end"
    EXPERIENCE_END = "experience_end"
    EVAL_START = "eval_start"
    EVAL_BATCH_START = "eval_batch_start"
    EVAL_BATCH_END = "eval_batch_end"
    EVAL_END = "eval_end"
    FIT_END = "fit_end"
    TEST_STREAM_START = "test_stream_start"
    TEST_SAMPLE_START = "test_sample_start"
    ADAPT_STEP_START = "adapt_step_start"
    ADAPT_STEP_END = "adapt_step_end"
    TEST_SAMPLE_END = "test_sample_end"
    TEST_STREAM_END = "test_stream_end"

    def __str__(self) -> str:
        return self.value
