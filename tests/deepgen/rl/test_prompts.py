"""RL prompt sets: every supported file layout, category filters, weighted reproducible draws."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepgen.config import PromptSetConfig
from deepgen.data.tiny_world import make_t2i_sample
from deepgen.data.writer import write_shard
from deepgen.rl.prompts import PromptSampler, load_prompt_set


def test_txt_jsonl_parquet_layouts(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n a blue square \n")
    rows = [{"caption": "a sign", "spec": {"width": 128, "height": 64}}, {"prompt": "a cat", "n": 1}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "x", "category": "text_rendering"}]), tmp_path / "p.parquet"
    )

    txt = load_prompt_set(PromptSetConfig(name="t", path=str(tmp_path / "p.txt"), rewards={"r": 1.0}))
    assert [p.text for p in txt] == ["a red circle", "a blue square"]
    assert txt[0].reward_weights == {"r": 1.0} and txt[0].set_name == "t"
    jsonl = load_prompt_set(PromptSetConfig(name="j", path=str(tmp_path / "p.jsonl")))
    assert [p.text for p in jsonl] == ["a sign", "a cat"]
    assert jsonl[0].metadata["spec"]["width"] == 128 and jsonl[1].metadata == {"n": 1}
    # the generation size follows the record's aspect ratio under the fix-pixels rule
    assert jsonl[0].size(64) == (96, 64) and jsonl[1].size(64) == (64, 64)
    parquet = load_prompt_set(
        PromptSetConfig(name="q", path=str(tmp_path / "p.parquet"), category="text_rendering")
    )
    assert [p.text for p in parquet] == ["x"]


def test_shards_and_category_filter(tmp_path):
    samples = [
        make_t2i_sample(0, i, category=c) for i, c in enumerate(["general", "text_rendering", "general"])
    ]
    write_shard(tmp_path / "t2i-000000.tar", samples)
    general = load_prompt_set(PromptSetConfig(name="g", path=str(tmp_path), category="general"))
    signs = load_prompt_set(PromptSetConfig(name="s", path=str(tmp_path), category="text_rendering"))
    assert len(general) == 2 and len(signs) == 1
    assert "spec" in general[0].metadata and '"' in signs[0].text


def test_errors_name_the_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt set 'x'.*missing.jsonl"):
        load_prompt_set(PromptSetConfig(name="x", path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_prompt_set(PromptSetConfig(name="b", path=str(tmp_path / "bad.jsonl")))
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_set(PromptSetConfig(name="c", path=str(tmp_path / "p.txt"), category="reasoning"))


def test_sampler_weights_and_reproducibility(tmp_path):
    (tmp_path / "a.txt").write_text("a1\na2\n")
    (tmp_path / "b.txt").write_text("b1\n")
    cfgs = [
        PromptSetConfig(name="a", path=str(tmp_path / "a.txt"), weight=1.0),
        PromptSetConfig(name="b", path=str(tmp_path / "b.txt"), weight=3.0),
    ]
    sampler = PromptSampler.from_configs(cfgs, seed=0)
    draws = [p.set_name for step in range(500) for p in sampler.draw(step, 0, 4)]
    assert Counter(draws)["b"] / len(draws) == pytest.approx(0.75, abs=0.03)
    # the same (seed, step, rank) always draws the same prompts; another rank draws others
    assert [p.text for p in sampler.draw(7, 1, 8)] == [
        p.text for p in PromptSampler.from_configs(cfgs, 0).draw(7, 1, 8)
    ]
    assert [p.text for p in sampler.draw(7, 0, 8)] != [p.text for p in sampler.draw(7, 1, 8)]
    with pytest.raises(ValueError, match="prompt_sets is empty"):
        PromptSampler.from_configs([], seed=0)
