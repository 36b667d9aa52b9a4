"""The one interface every reward implements, and the registry that builds rewards from config.

A reward scores a batch of generated images against their prompts and per-sample metadata (the
prompt set's record: e.g. a tiny-world ``spec``). It returns a score and a validity flag per sample:
a sample whose score could not be computed (service down after retries, unreadable answer) is
marked invalid and left out of the advantage statistics, never silently scored 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class RewardResult:
    """Scores of one reward over a batch; ``scores[i]`` is meaningless where ``valid[i]`` is False."""

    scores: np.ndarray  # [N] float64
    valid: np.ndarray  # [N] bool
    info: dict[str, float] | None = None  # optional diagnostics (e.g. retries, failed calls)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.valid = np.asarray(self.valid, dtype=bool).reshape(-1)
        if self.scores.shape != self.valid.shape:
            raise ValueError(f"scores {self.scores.shape} and valid {self.valid.shape} differ in shape")
        self.valid &= np.isfinite(self.scores)

    @classmethod
    def all_invalid(cls, n: int, **info: float) -> RewardResult:
        return cls(np.zeros(n), np.zeros(n, dtype=bool), dict(info) or None)


class Reward(Protocol):
    """``images``: HxWx3 uint8 arrays; ``group_ids``: which rollout group each image belongs to
    (pairwise rewards compare images within a group; others ignore it)."""

    name: str

    def __call__(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]],
        group_ids: Sequence[int],
    ) -> RewardResult: ...


REWARDS: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Class decorator: make a reward buildable as ``build_reward(name, **options)``."""

    def add(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in REWARDS:
            raise ValueError(f"reward '{name}' is registered twice")
        REWARDS[name] = factory
        return factory

    return add


def build_reward(name: str, **options: Any) -> Reward:
    """Build a registered reward; an unknown name fails with the list of known ones."""
    import deepgen.rewards  # noqa: F401  (registers the built-in rewards)

    if name not in REWARDS:
        raise ValueError(f"unknown reward '{name}'; registered rewards: {sorted(REWARDS)}")
    return REWARDS[name](**options)
