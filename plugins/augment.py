"""Train-time augmentation on the device: random-resized crop and horizontal flip per image.

The training augmentation of the prompt-pool reference code: torchvision's
``RandomResizedCrop`` (aspect 3/4-4/3, bilinear) and a horizontal flip with probability 0.5.
The crop's area range differs between them: the L2P and DualPrompt ports (and PGP, built on
them) use 5-100 % (l2p-pytorch datasets.py:198-202, dualprompt-pytorch datasets.py:198-202),
CODA-Prompt keeps torchvision's default 8-100 % (CODA-Prompt dataloaders/utils.py:44-45),
which is this strategy's default; the paper configs set ``scale`` explicitly. The NSP code
(VPTinNSforCL utils/dataset_builder.py:434) crops with bicubic resampling, no flip, after an
AutoAugment policy that this strategy does not have.

Here the crop is applied to the whole batch at once on its device after the backbone's
resize to its input size and normalisation (cropping only resamples, so the order does not
matter; a crop of the upsampled image equals the reference's crop of the original up to the
second resampling). Evaluation and test-time phases are left untouched.

Randomness is drawn from a generator keyed by (seed, experience, epoch, batch), so a resumed
run augments exactly as an uninterrupted one would.
"""

from __future__ import annotations

from typing import Sequence

from driftprompt.engine import State, hookimpl
from driftprompt.engine.runtime import data_generator
from driftprompt.streams.transforms import TrainAugment


class Augment:
    """Random-resized crop and flip of every training batch.

    Args:
        scale: range of the crop's area as a fraction of the image ((0.08, 1.0), torchvision's
            and CODA-Prompt's; the L2P and DualPrompt ports use (0.05, 1.0)).
        ratio: range of the crop's aspect ratio ((0.75, 1.3333)).
        hflip: probability of a horizontal flip (0.5).
        interpolation: ``"bilinear"`` or ``"bicubic"`` (bilinear).
        seed: added to the run seed for the augmentation draws (0).
    """

    def __init__(self, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5, interpolation: str = "bilinear", seed: int = 0) -> None:
        self.augment = TrainAugment(scale=tuple(scale), ratio=tuple(ratio), hflip=hflip, interpolation=interpolation)  # type: ignore[arg-type]
        self.seed = seed

    # tryfirst: every other strategy's batch_start (prototype sums, query caches) must see the
    # augmented batch, whatever the config order.
    @hookimpl(tryfirst=True)
    def batch_start(self, state: State) -> None:
        if state.phase != "train" or state.inputs is None:
            return
        run_seed = state.config.seed if state.config is not None else 0
        gen = data_generator(run_seed + self.seed, state.experience.index if state.experience is not None else 0, state.epoch, state.batch_index, 1)
        state.inputs = self.augment(state.inputs, gen)
        state.query = None
        # the frozen query of these inputs belongs to this draw alone: the query cache stands aside
        state.batch["augmented"] = True


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register("augment", Augment)
