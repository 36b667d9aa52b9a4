"""RewardSet: retries, failures as counted all-invalid results (never zeros), and the process pool."""

import random
import time
from concurrent.futures import Future

import numpy as np
import pytest

from deepgen.data.tiny_world import random_sign_scene, render_scene, sign_description
from deepgen.rewards.base import RewardResult, register_reward
from deepgen.rewards.runner import RetryPolicy, RewardHandle, RewardSet

CALLS: dict[str, int] = {}


@register_reward("test_constant")
class ConstantReward:
    name = "test_constant"

    def __init__(self, value: float = 0.25) -> None:
        self.value = value

    def __call__(self, images, prompts, metadata, group_ids):
        return RewardResult(np.full(len(images), self.value), np.ones(len(images), bool))


@register_reward("test_flaky")
class FlakyReward:
    """Raises on its first ``failures`` calls (counted per instance), then scores 1."""

    name = "test_flaky"

    def __init__(self, failures: int = 1_000, sleep_s: float = 0.0, wrong_length: bool = False) -> None:
        self.failures, self.sleep_s, self.wrong_length, self.calls = failures, sleep_s, wrong_length, 0

    def __call__(self, images, prompts, metadata, group_ids):
        self.calls += 1
        time.sleep(self.sleep_s)
        if self.calls <= self.failures:
            raise ConnectionError("reward service down")
        n = len(images) + self.wrong_length
        return RewardResult(np.ones(n), np.ones(n, bool))


def _batch(n: int = 4):
    images = [np.zeros((8, 8, 3), np.uint8)] * n
    return images, ["p"] * n, [{}] * n, [i // 2 for i in range(n)]


FAST_RETRY = RetryPolicy(max_retries=2, backoff_s=0.0)


def test_failing_reward_is_all_invalid_and_counted_not_zero():
    rewards = RewardSet({"test_constant": {}, "test_flaky": {}}, retry=FAST_RETRY, imports=())
    scores = rewards(*_batch())
    assert not scores.results["test_flaky"].valid.any()
    np.testing.assert_allclose(scores.results["test_constant"].scores, 0.25)  # untouched by the failure
    metrics = scores.metrics()
    assert metrics["reward_stats/test_flaky/failed_calls"] == 1.0
    assert metrics["reward_stats/test_flaky/failed_tries"] == 3.0  # first try + 2 retries
    assert metrics["reward_stats/test_flaky/invalid_samples"] == 4.0
    assert metrics["reward_stats/test_constant/failed_calls"] == 0.0
    assert "perf/reward_test_flaky_s" in metrics


def test_retry_recovers():
    scores = RewardSet({"test_flaky": {"failures": 2}}, retry=FAST_RETRY, imports=())(*_batch())
    assert scores.results["test_flaky"].valid.all()
    assert scores.failed_calls == {} and scores.failed_tries == {"test_flaky": 2}


@pytest.mark.parametrize(
    "options, policy",
    [
        ({"failures": 0, "sleep_s": 0.3}, RetryPolicy(max_retries=0, call_timeout_s=0.05)),  # hangs
        ({"failures": 0, "wrong_length": True}, RetryPolicy(max_retries=1, backoff_s=0.0)),  # bad output
    ],
)
def test_hung_or_malformed_call_fails(options, policy):
    scores = RewardSet({"test_flaky": options}, retry=policy, imports=())(*_batch())
    assert not scores.results["test_flaky"].valid.any()
    assert scores.failed_calls == {"test_flaky": 1}


def test_crashed_worker_gives_counted_all_invalid():
    future: Future = Future()
    future.set_exception(RuntimeError("worker died"))
    scores = RewardHandle(future, ["ocr", "clip"], 3).result()
    assert all(not r.valid.any() and r.scores.shape == (3,) for r in scores.results.values())
    assert scores.failed_calls == {"ocr": 1, "clip": 1}


def test_unknown_reward_lists_known_ones():
    with pytest.raises(ValueError, match="test_constant"):
        RewardSet({"no_such_reward": {}}, imports=())


def test_process_pool_matches_in_process(tiny_clip_dir):
    rng = random.Random(5)
    specs = [random_sign_scene(rng, 128, 64) for _ in range(3)]
    images = [np.asarray(render_scene(s)) for s in specs]
    prompts = [sign_description(s["sign"]) for s in specs[:2]] + ["a red circle"]  # last: no quote
    batch = (images, prompts, [{}] * 3, [0, 0, 1])
    config = {"ocr": {"num_threads": 1}, "clip": {"model_path": str(tiny_clip_dir)}}
    imports = ("deepgen.rewards.ocr", "deepgen.rewards.clip")

    local = RewardSet(config, num_workers=0, imports=imports)(*batch)
    with RewardSet(config, num_workers=1, imports=imports, torch_threads=1) as pooled:
        handles = [pooled.submit(*batch), pooled.submit(*batch)]  # queued while the first is scored
        remote = [h.result() for h in handles]
    for scores in remote:
        for name in config:
            np.testing.assert_allclose(scores.results[name].scores, local.results[name].scores, atol=1e-6)
            np.testing.assert_array_equal(scores.results[name].valid, local.results[name].valid)
    assert local.results["ocr"].valid.tolist() == [True, True, False]


def test_pool_configuration_error_is_raised_at_start():
    with pytest.raises(ValueError, match="no_quote"):
        RewardSet({"ocr": {"no_quote": "skip"}}, num_workers=1, imports=("deepgen.rewards.ocr",))
