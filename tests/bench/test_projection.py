"""bench/projection.py: GPU-hours of the paper's schedule from perf.json, checked by hand."""

from __future__ import annotations

import json

import pytest

from tests.bench.test_perf import bench_module

projection = bench_module("projection")


def result(ours_s: float, plain_s: float, images: int) -> dict:
    return {"ours": {"seconds": ours_s, "images": images}, "plain": {"seconds": plain_s, "images": images}}


RESULTS = {
    "train_align": result(0.4, 0.8, 4),  # 0.1 s per image ours, 0.2 plain
    "train_align_edit": result(0.8, 1.6, 4),  # 0.2 / 0.4
    "train_sft_t2i": result(1.2, 2.4, 4),  # 0.3 / 0.6
    "train_sft_edit": result(2.4, 4.8, 4),  # 0.6 / 1.2
    "grpo_rollout": result(4.0, 8.0, 8),  # 0.5 / 1.0
    "grpo_update": result(2.0, 4.0, 8),  # 0.25 / 0.5
}


def test_hours_by_hand():
    hours = projection.project(RESULTS)
    align = 51_200_000 * (0.75 * 0.1 + 0.25 * 0.2) / 3600  # 1,777.8
    sft = 102_400_000 * (2 / 3 * 0.3 + 1 / 3 * 0.6) / 3600  # 11,377.8
    rl = 1_500 * 256 * (0.5 + 0.25) / 3600  # 80
    assert hours["align"]["ours"] == pytest.approx(align)
    assert hours["sft"]["ours"] == pytest.approx(sft)
    assert hours["rl"]["ours"] == pytest.approx(rl)
    assert hours["total"]["ours"] == pytest.approx(align + sft + rl)
    for stage in hours:
        assert hours[stage]["plain"] == pytest.approx(2 * hours[stage]["ours"])


def test_cli_table_and_errors(tmp_path, capsys):
    path = tmp_path / "perf.json"
    path.write_text(json.dumps({"results": RESULTS}))
    projection.main([str(path)])
    out = capsys.readouterr().out
    assert "| sft | 11,378 | 22,756 | 2.00 |" in out and "| total |" in out
    failed = {
        **RESULTS,
        "grpo_update": {**RESULTS["grpo_update"], "ours": {"error": "OutOfMemoryError: ..."}},
    }
    path.write_text(json.dumps({"results": failed}))
    with pytest.raises(SystemExit, match="ours side failed"):
        projection.main([str(path)])
    path.write_text(json.dumps({"results": {"train_align": RESULTS["train_align"]}}))
    with pytest.raises(SystemExit, match="lacks"):
        projection.main([str(path)])
    with pytest.raises(SystemExit, match="does not exist"):
        projection.main([str(tmp_path / "none.json")])
