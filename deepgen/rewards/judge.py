"""Pairwise VLM judge reward, as the original ``unifiedreward_think``, over any OpenAI-compatible server.

For each rollout group, every unordered pair of its images (C(n, 2) pairs, the lower index shown as
"Image 1") goes to ``/v1/chat/completions`` in one user message: both images as base64 JPEG data URLs,
then the prompt and the question. The verdict is read from the ``<answer>...</answer>`` span (or the
whole reply without tags): "Image 1 is better" -> 1 : 0, "Image 2 is better" -> 0 : 1, an explicit
tie -> 0.5 : 0.5. A sample's reward is its win rate over its valid comparisons, in [0, 1].

Deviation from the original: a comparison whose request fails (HTTP error, timeout, unreachable
server) or whose reply names no verdict is retried with exponential backoff, and after
``max_retries`` retries it is dropped and counted, not scored as a tie; a sample left without any
valid comparison is invalid for this reward.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from deepgen.rewards.base import RewardResult, register_reward

log = logging.getLogger(__name__)

DEFAULT_QUESTION = (
    "You are given two images generated from the same text prompt.\n"
    "Prompt: {prompt}\n"
    "Which image better matches the prompt? Consider semantic faithfulness to the prompt first, "
    "then visual quality. Reason inside <think></think>, then answer inside <answer></answer> with "
    "exactly one of: 'Image 1 is better' or 'Image 2 is better'."
)

_ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_IMAGE_1 = re.compile(r"\bimage\s*1\s+is\s+better\b")
_IMAGE_2 = re.compile(r"\bimage\s*2\s+is\s+better\b")
_TIE = re.compile(
    r"\b(tie|equally (good|bad|well|matched)|both images are equally|neither (image )?is better)\b"
)


class MalformedAnswer(ValueError):
    """The judge replied, but no single verdict could be read from its answer."""


def parse_verdict(reply: str) -> float:
    """Score of Image 1 in one comparison: 1.0 (Image 1 better), 0.0 (Image 2 better) or 0.5 (an
    explicitly stated tie). Raises ``MalformedAnswer`` when the answer names none or several."""
    spans = _ANSWER_SPAN.findall(reply)
    if spans:
        text = spans[-1]
    elif "<answer>" in reply.lower():  # reply cut off by max_tokens inside the answer tag
        text = reply[reply.lower().rindex("<answer>") + len("<answer>") :]
    else:
        text = reply
    text = " ".join(text.lower().split())
    found = [
        score for pattern, score in ((_IMAGE_1, 1.0), (_IMAGE_2, 0.0), (_TIE, 0.5)) if pattern.search(text)
    ]
    if len(found) != 1:
        raise MalformedAnswer(f"no single verdict in answer {text[:200]!r}")
    return found[0]


def group_pairs(group_ids: Sequence[int]) -> list[tuple[int, int]]:
    """All pairs (i, j), i < j, of sample indices that share a group id."""
    members: dict[int, list[int]] = defaultdict(list)
    for index, group in enumerate(group_ids):
        members[int(group)].append(index)
    return [(a, b) for idx in members.values() for k, a in enumerate(idx) for b in idx[k + 1 :]]


def win_rates(
    n: int, pairs: Sequence[tuple[int, int]], outcomes: Sequence[float | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample win rate over valid comparisons; ``outcomes[k]`` is the score of the first image
    of ``pairs[k]`` (None: the comparison failed). Returns (scores, valid)."""
    wins, counts = np.zeros(n), np.zeros(n)
    for (a, b), outcome in zip(pairs, outcomes, strict=True):
        if outcome is None:
            continue
        wins[a] += outcome
        wins[b] += 1.0 - outcome
        counts[a] += 1
        counts[b] += 1
    valid = counts > 0
    return np.divide(wins, counts, out=np.zeros(n), where=valid), valid


def jpeg_data_url(image: np.ndarray, quality: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").save(
        buf, format="JPEG", quality=quality
    )
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@register_reward("vlm_judge")
class PairwiseJudgeReward:
    """``base_url``: server root, e.g. ``http://127.0.0.1:18087`` (``/v1/chat/completions`` is appended;
    a trailing ``/v1`` is accepted). ``model``: the served model name (vLLM ``--served-model-name``).
    ``api_key_env``: name of an environment variable holding a bearer token (None: no auth).
    ``timeout_s``: socket timeout per request. ``max_retries``: retries per comparison after the first
    try, with ``backoff_s * 2**attempt`` seconds between tries. ``max_concurrency``: requests in
    flight. ``jpeg_quality``: of the uploaded images (95 as the original). ``max_tokens``: of the reply
    (the original's 4096 leaves room for the judge's reasoning). ``question``: the text after the
    images, with ``{prompt}`` replaced by the sample's prompt.
    """

    name = "vlm_judge"

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:18087",
        model: str = "UnifiedReward",
        api_key_env: str | None = None,
        timeout_s: float = 300.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_concurrency: int = 64,
        jpeg_quality: int = 95,
        max_tokens: int = 4096,
        question: str = DEFAULT_QUESTION,
    ) -> None:
        root = base_url.rstrip("/")
        root = root.removesuffix("/v1")
        self.url = root + "/v1/chat/completions"
        self.model = model
        self.api_key: str | None = None
        if api_key_env is not None:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ValueError(f"vlm_judge: api_key_env names ${api_key_env}, which is not set")
        if "{prompt}" not in question:
            raise ValueError("vlm_judge: question must contain '{prompt}'")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self.jpeg_quality = jpeg_quality
        self.max_tokens = max_tokens
        self.question = question

    def _post(self, body: dict[str, Any]) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            reply = json.loads(response.read())
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as err:
            raise MalformedAnswer(f"unexpected response body {str(reply)[:200]!r}") from err

    def compare(self, image_1: str, image_2: str, prompt: str) -> tuple[float | None, int, str]:
        """One comparison of two data-URL images, retried; returns (score of Image 1 or None when it
        failed for good, retries used, last error)."""
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_1}},
                        {"type": "image_url", "image_url": {"url": image_2}},
                        {"type": "text", "text": self.question.format(prompt=prompt)},
                    ],
                }
            ],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        error, attempt = "", 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return parse_verdict(self._post(body)), attempt, ""
            except urllib.error.HTTPError as err:
                error = f"HTTP {err.code} {err.reason}"
                if 400 <= err.code < 500 and err.code not in (408, 429):
                    break  # a request the server rejects as malformed will not get better
            except (OSError, MalformedAnswer, json.JSONDecodeError) as err:  # URLError, timeouts
                error = f"{type(err).__name__}: {err}"
        return None, attempt, error

    def __call__(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]],
        group_ids: Sequence[int],
    ) -> RewardResult:
        n = len(images)
        pairs = group_pairs(group_ids)
        urls = [jpeg_data_url(image, self.jpeg_quality) for image in images]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(pairs)))) as pool:
            answers = list(pool.map(lambda p: self.compare(urls[p[0]], urls[p[1]], prompts[p[0]]), pairs))
        outcomes = [score for score, _, _ in answers]
        failed = [error for score, _, error in answers if score is None]
        if failed:
            log.warning(
                "vlm_judge: %d of %d comparisons failed at %s after %d retries; last error: %s",
                len(failed),
                len(pairs),
                self.url,
                self.max_retries,
                failed[-1],
            )
        scores, valid = win_rates(n, pairs, outcomes)
        info = {
            "comparisons": float(len(pairs)),
            "failed_comparisons": float(len(failed)),
            "retries": float(sum(retries for _, retries, _ in answers)),
        }
        return RewardResult(scores, valid, info)
