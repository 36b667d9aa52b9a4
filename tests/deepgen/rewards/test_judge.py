"""Pairwise VLM judge against a small OpenAI-compatible server on localhost.

The fake judge decodes both data-URL images and prefers the brighter one (equal brightness: a tie),
so every win rate can be checked by hand. Failure modes are switched on per test.
"""

import base64
import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from deepgen.rewards.judge import MalformedAnswer, PairwiseJudgeReward, group_pairs, parse_verdict, win_rates


class FakeJudge(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.lock = threading.Lock()
        self.requests = 0
        self.fail_first = 0  # answer HTTP 500 to this many requests first
        self.status = 500
        self.sleep_s = 0.0
        self.malformed = False
        self.bodies: list[dict] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _brightness(data_url: str) -> float:
    raw = base64.b64decode(data_url.split(",", 1)[1])
    return float(np.asarray(Image.open(io.BytesIO(raw))).mean())


class JudgeHandler(BaseHTTPRequestHandler):
    server: FakeJudge

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests += 1
            self.server.bodies.append(body)
            fail = self.server.requests <= self.server.fail_first
        if self.path != "/v1/chat/completions":
            return self.send_error(404)
        if fail:
            return self.send_error(self.server.status)
        time.sleep(self.server.sleep_s)
        content = body["messages"][0]["content"]
        first, second = (_brightness(part["image_url"]["url"]) for part in content[:2])
        if self.server.malformed:
            answer = "<think>hmm</think><answer>I cannot decide.</answer>"
        elif abs(first - second) < 2:
            answer = "<think>same</think><answer>Both images are equally good</answer>"
        else:
            answer = f"<think>compare</think><answer>Image {1 if first > second else 2} is better</answer>"
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@pytest.fixture
def server():
    srv = FakeJudge()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _gray(value: int) -> np.ndarray:
    return np.full((16, 16, 3), value, np.uint8)


def _judge(url: str, **options) -> PairwiseJudgeReward:
    options = {"timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01, "max_concurrency": 4} | options
    return PairwiseJudgeReward(base_url=url, model="fake", **options)


def test_parse_verdict():
    assert parse_verdict("<think>Image 2 is better at X</think><answer>Image 1 is better</answer>") == 1.0
    assert parse_verdict("<answer> image 2  is better. </answer>") == 0.0
    assert parse_verdict("Image 2 is better") == 0.0  # no tags: the whole reply
    assert parse_verdict("<answer>It's a tie</answer>") == 0.5
    assert parse_verdict("<answer>Both images are equally good</answer>") == 0.5
    assert parse_verdict("<think>Image 2 is better at X</think><answer>Image 1 is better") == 1.0  # cut off
    for bad in ("<answer>Image 3</answer>", "Image 1 is better. Image 2 is better.", ""):
        with pytest.raises(MalformedAnswer):
            parse_verdict(bad)


def test_pairs_and_win_rates():
    pairs = group_pairs([7, 7, 3, 7, 3, 9, 4, 4])
    assert pairs == [(0, 1), (0, 3), (1, 3), (2, 4), (6, 7)]  # sample 5 is alone in its group
    scores, valid = win_rates(8, pairs, [1.0, 0.5, None, 0.0, None])
    np.testing.assert_allclose(scores[:5], [0.75, 0.0, 0.0, 0.5, 1.0])
    assert valid.tolist() == [True, True, True, True, True, False, False, False]


def test_win_rates_from_server(server):
    # Group 0: brightness 200 > 100 > 0 -> win rates 1, 0.5, 0. Group 1: a tie -> 0.5 each.
    images = [_gray(100), _gray(200), _gray(0), _gray(50), _gray(50)]
    result = _judge(server.base_url)(images, ["p0"] * 3 + ["p1"] * 2, [{}] * 5, [0, 0, 0, 1, 1])
    np.testing.assert_allclose(result.scores, [0.5, 1.0, 0.0, 0.5, 0.5])
    assert result.valid.all()
    assert result.info == {"comparisons": 4.0, "failed_comparisons": 0.0, "retries": 0.0}
    assert all(body["model"] == "fake" and body["temperature"] == 0.0 for body in server.bodies)
    contents = [body["messages"][0]["content"] for body in server.bodies]
    assert all(c[0]["image_url"]["url"].startswith("data:image/jpeg;base64,") for c in contents)
    assert sorted("Prompt: p0" in c[2]["text"] for c in contents) == [False, True, True, True]


def test_server_error_then_recovery_is_retried(server):
    server.fail_first = 2
    result = _judge(server.base_url, max_concurrency=1)([_gray(10), _gray(250)], ["p", "p"], [{}] * 2, [0, 0])
    np.testing.assert_allclose(result.scores, [0.0, 1.0])
    assert result.valid.all()
    assert result.info["retries"] == 2.0 and result.info["failed_comparisons"] == 0.0
    assert server.requests == 3


def test_client_error_is_not_retried(server, caplog):
    server.fail_first, server.status = 100, 400
    with caplog.at_level(logging.WARNING):
        result = _judge(server.base_url)([_gray(10), _gray(250)], ["p", "p"], [{}] * 2, [0, 0])
    assert not result.valid.any()
    assert server.requests == 1
    assert "HTTP 400" in caplog.text


def test_timeout_makes_samples_invalid_and_is_counted(server):
    server.sleep_s = 0.5
    images = [_gray(10), _gray(250), _gray(100)]
    result = _judge(server.base_url, timeout_s=0.1, max_retries=1)(images, ["p"] * 3, [{}] * 3, [0, 0, 1])
    assert not result.valid[:2].any()
    assert not result.valid[2]  # alone in its group: nothing to compare with
    assert result.info == {"comparisons": 1.0, "failed_comparisons": 1.0, "retries": 1.0}
    assert server.requests == 2


def test_malformed_answer_is_retried_then_invalid(server):
    server.malformed = True
    result = _judge(server.base_url)([_gray(10), _gray(250)], ["p", "p"], [{}] * 2, [0, 0])
    assert not result.valid.any()
    assert result.info["failed_comparisons"] == 1.0
    assert server.requests == 3  # first try + max_retries


def test_unreachable_server_warns_with_url(caplog):
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with caplog.at_level(logging.WARNING):
        result = _judge(url, max_retries=1)([_gray(10), _gray(250)], ["p", "p"], [{}] * 2, [0, 0])
    assert not result.valid.any() and result.info["failed_comparisons"] == 1.0
    assert f"{url}/v1/chat/completions" in caplog.text


def test_config_mistakes_fail_by_name(monkeypatch):
    monkeypatch.delenv("DEEPGEN_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="DEEPGEN_TEST_JUDGE_KEY"):
        PairwiseJudgeReward(api_key_env="DEEPGEN_TEST_JUDGE_KEY")
    with pytest.raises(ValueError, match="prompt"):
        PairwiseJudgeReward(question="which is better?")
