"""Run the configured rewards over a batch: retries, failure accounting, and an optional process pool.

A reward call that still raises (or hangs past ``call_timeout_s``) after its retries makes that
reward's result all-invalid for the batch and is counted, where the original zeroed it: an invalid
sample is left out of the advantage statistics, a zero would be a strong, wrong training signal.

With ``num_workers > 0`` the rewards live in worker processes ("spawn" context, so no CUDA or thread
state is forked): each worker builds them from their (name, options) specs, so only the specs, the
images and the results cross process boundaries. ``submit`` returns at once, so the next rollout can
be generated while the last one is being scored. ``num_workers = 0`` scores in-process at ``submit``
time, for tests and debugging.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepgen.rewards.base import Reward, RewardResult, build_reward

log = logging.getLogger(__name__)


@dataclass
class RewardBatch:
    """What every reward sees: images HxWx3 uint8, and per-sample prompt, metadata and group id."""

    images: Sequence[np.ndarray]
    prompts: Sequence[str]
    metadata: Sequence[dict[str, Any]]
    group_ids: Sequence[int]

    def __post_init__(self) -> None:
        sizes = {len(self.images), len(self.prompts), len(self.metadata), len(self.group_ids)}
        if len(sizes) != 1:
            raise ValueError(
                f"reward batch fields differ in length: images {len(self.images)}, prompts "
                f"{len(self.prompts)}, metadata {len(self.metadata)}, group_ids {len(self.group_ids)}"
            )


@dataclass
class RetryPolicy:
    """``max_retries`` retries after the first try, ``backoff_s * 2**k`` seconds apart;
    ``call_timeout_s``: a call running longer counts as failed (None: no limit)."""

    max_retries: int = 2
    backoff_s: float = 1.0
    call_timeout_s: float | None = None


@dataclass
class RewardScores:
    """Every reward's result over one batch, and what it cost."""

    results: dict[str, RewardResult]
    failed_calls: dict[str, int] = field(default_factory=dict)  # calls still failing after all retries
    failed_tries: dict[str, int] = field(default_factory=dict)  # tries that raised, recovered or not
    seconds: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat, namespaced counters for the logger (the reward means are the stage's to log)."""
        out: dict[str, float] = {}
        for name, result in self.results.items():
            out[f"reward_stats/{name}/invalid_samples"] = float((~result.valid).sum())
            out[f"reward_stats/{name}/failed_calls"] = float(self.failed_calls.get(name, 0))
            out[f"reward_stats/{name}/failed_tries"] = float(self.failed_tries.get(name, 0))
            out[f"perf/reward_{name}_s"] = self.seconds.get(name, 0.0)
            for key, value in (result.info or {}).items():
                out[f"reward_stats/{name}/{key}"] = float(value)
        return out


def _call_once(reward: Reward, batch: RewardBatch, timeout_s: float | None) -> RewardResult:
    args = (batch.images, batch.prompts, batch.metadata, batch.group_ids)
    if timeout_s is None:
        result = reward(*args)
    else:
        # A hung call cannot be killed from Python: it is abandoned to its thread and the batch goes on
        # without it (a call that never returns still delays interpreter exit).
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reward-{reward.name}")
        try:
            result = executor.submit(reward, *args).result(timeout=timeout_s)
        except FutureTimeout as err:
            raise TimeoutError(f"reward call took longer than {timeout_s} s") from err
        finally:
            executor.shutdown(wait=False)
    if len(result.scores) != len(batch.images):
        raise ValueError(f"returned {len(result.scores)} scores for {len(batch.images)} images")
    return result


def score_batch(rewards: Mapping[str, Reward], batch: RewardBatch, policy: RetryPolicy) -> RewardScores:
    """Call every reward on the batch with retries; a reward that keeps failing is all-invalid."""
    scores = RewardScores(results={})
    for name, reward in rewards.items():
        start = time.perf_counter()
        failures = 0
        for attempt in range(policy.max_retries + 1):
            if attempt:
                time.sleep(policy.backoff_s * 2 ** (attempt - 1))
            try:
                scores.results[name] = _call_once(reward, batch, policy.call_timeout_s)
                break
            except Exception as err:  # any reward bug or outage must not stop training
                failures += 1
                log.warning(
                    "reward '%s' failed (try %d of %d): %r", name, attempt + 1, policy.max_retries + 1, err
                )
        else:
            scores.results[name] = RewardResult.all_invalid(len(batch.images))
            scores.failed_calls[name] = 1
        scores.failed_tries[name] = failures
        scores.seconds[name] = time.perf_counter() - start
    return scores


# ---- worker-process side -------------------------------------------------------------------------

_WORKER_SPECS: dict[str, dict[str, Any]] = {}
_WORKER_REWARDS: dict[str, Reward] | None = None


def _init_worker(specs: dict[str, dict[str, Any]], imports: Sequence[str], torch_threads: int | None) -> None:
    global _WORKER_SPECS
    _WORKER_SPECS = specs
    for module in imports:
        importlib.import_module(module)
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)


def _worker_rewards() -> dict[str, Reward]:
    global _WORKER_REWARDS
    if _WORKER_REWARDS is None:
        _WORKER_REWARDS = build_rewards(_WORKER_SPECS)
    return _WORKER_REWARDS


def _warm_up_worker() -> list[str]:
    return list(_worker_rewards())


def _score_in_worker(batch: RewardBatch, policy: RetryPolicy) -> RewardScores:
    return score_batch(_worker_rewards(), batch, policy)


# ---- main-process side ---------------------------------------------------------------------------


def build_rewards(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, Reward]:
    """``{registered name: constructor options}`` -> ``{name: reward}``."""
    return {name: build_reward(name, **dict(options or {})) for name, options in specs.items()}


class RewardHandle:
    """A submitted batch; ``result()`` blocks until it is scored and never raises for a reward
    failure (a crashed worker makes every reward all-invalid and counted)."""

    def __init__(self, future: Future, names: Sequence[str], n: int) -> None:
        self._future = future
        self._names = list(names)
        self._n = n

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> RewardScores:
        try:
            return self._future.result()
        except Exception as err:
            log.warning("reward worker failed, all rewards invalid for this batch: %r", err)
            return RewardScores(
                results={name: RewardResult.all_invalid(self._n) for name in self._names},
                failed_calls=dict.fromkeys(self._names, 1),
            )


class RewardSet:
    """The configured rewards, scored with retries, in-process or in a pool of worker processes.

    ``specs``: ``{registered reward name: constructor options}``. ``num_workers``: worker processes
    (0: in-process). ``imports``: modules a worker imports so that its rewards are registered (the
    built-ins register through ``deepgen.rewards``). ``torch_threads``: ``torch.set_num_threads`` in
    each worker, so reward models do not compete with training for every core.
    """

    def __init__(
        self,
        specs: Mapping[str, Mapping[str, Any]],
        num_workers: int = 0,
        retry: RetryPolicy | None = None,
        imports: Sequence[str] = ("deepgen.rewards",),
        torch_threads: int | None = None,
    ) -> None:
        self.specs = {name: dict(options or {}) for name, options in specs.items()}
        self.retry = retry or RetryPolicy()
        self.num_workers = num_workers
        self._imports = tuple(imports)
        self._torch_threads = torch_threads
        self._rewards: dict[str, Reward] | None = None
        self._pool: ProcessPoolExecutor | None = None
        if num_workers == 0:
            for module in self._imports:
                importlib.import_module(module)
            self._rewards = build_rewards(self.specs)
        else:
            self._start_pool()

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def _start_pool(self) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=self.num_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.specs, self._imports, self._torch_threads),
        )
        # Build the rewards now (in at least one worker), so a configuration mistake (missing model
        # directory, bad option) fails here with its own message, not as all-invalid batches later.
        warm = [self._pool.submit(_warm_up_worker) for _ in range(self.num_workers)]
        for future in warm:
            future.result()

    def submit(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]],
        group_ids: Sequence[int],
    ) -> RewardHandle:
        """Start scoring a batch; in-process mode scores it before returning."""
        batch = RewardBatch([np.asarray(i) for i in images], list(prompts), list(metadata), list(group_ids))
        if self._rewards is not None:
            future: Future = Future()
            future.set_result(score_batch(self._rewards, batch, self.retry))
            return RewardHandle(future, self.names, len(images))
        assert self._pool is not None
        try:
            future = self._pool.submit(_score_in_worker, batch, self.retry)
        except BrokenExecutor:  # a worker died since the last batch; start a fresh pool once
            log.warning("reward worker pool is broken, restarting it")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._start_pool()
            future = self._pool.submit(_score_in_worker, batch, self.retry)
        return RewardHandle(future, self.names, len(images))

    def __call__(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]],
        group_ids: Sequence[int],
    ) -> RewardScores:
        return self.submit(images, prompts, metadata, group_ids).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
