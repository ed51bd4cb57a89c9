"""Training pairs drawn at random, reproducibly: the moving image by index, the fixed one
drawn among the other images, a new draw every epoch.

The draw for item ``i`` in epoch ``e`` comes from ``numpy.random.default_rng([seed, e, i])``,
so it does not depend on DataLoader workers, their number, or a restart: a resumed run
sees the same pairs as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from ignite.engine import Engine, Events
from monai.data import Dataset
from monai.transforms import apply_transform


class RandomPairDataset(Dataset):
    """``{"moving": images[i], "fixed": images[j]}``, ``j != i`` drawn per (seed, epoch, i).

    Args:
        images: paths of the training images (at least two).
        transform: MONAI transform applied to the pair dict (loading, scaling, ...).
        seed: base seed of the draws.
    """

    def __init__(self, images: Sequence[str], transform: Callable | None = None, seed: int = 0) -> None:
        if len(images) < 2:
            raise ValueError("RandomPairDataset needs at least two images")
        super().__init__(data=list(images), transform=transform)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch`` (the DataLoader's workers pick it up at the next epoch)."""
        self.epoch = int(epoch)

    def fixed_index(self, index: int) -> int:
        j = int(np.random.default_rng([self.seed, self.epoch, index]).integers(len(self.data) - 1))
        return j + (j >= index)  # skip the moving image itself

    def pair(self, index: int) -> dict:
        moving, fixed = self.data[index], self.data[self.fixed_index(index)]
        return {"moving": moving, "fixed": fixed, "moving_path": moving, "fixed_path": fixed}

    def _transform(self, index: int):
        item = self.pair(index)
        return apply_transform(self.transform, item) if self.transform is not None else item


class SetEpoch:
    """Ignite handler: before each epoch, tell the dataset (and a DistributedSampler) which epoch it is."""

    def __init__(self, dataset: RandomPairDataset, sampler=None) -> None:
        self.dataset, self.sampler = dataset, sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.dataset.set_epoch(engine.state.epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(engine.state.epoch)
