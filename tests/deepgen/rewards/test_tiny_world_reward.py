"""The "tiny_world" reward: graded scorer scores per sample, invalid where no spec can be read."""

from __future__ import annotations

import numpy as np

from deepgen.data.tiny_world import draw_sample_meta, render_scene
from deepgen.rewards.base import build_reward
from deepgen.rewards.tiny_world import TinyWorldReward


def test_scores_t2i_and_edit_samples_and_marks_unusable_metadata_invalid():
    t2i = draw_sample_meta("t2i", "general", "eval", 0, 0)
    edit = draw_sample_meta("edit", "general", "eval", 0, 0)
    good = np.asarray(render_scene(t2i["spec"]))
    blank = np.full_like(good, 255)
    bad_spec = dict(t2i["spec"], objects=[dict(t2i["spec"]["objects"][0], color="teal")])
    images = [good, blank, np.asarray(render_scene(edit["target_spec"])), good, good]
    metadata = [t2i, t2i, edit, {"caption": "no spec"}, {"spec": bad_spec}]
    prompts = [t2i["caption"]] * 2 + [edit["instruction"]] + [t2i["caption"]] * 2
    result = TinyWorldReward()(images, prompts, metadata, group_ids=[0, 0, 1, 2, 2])
    assert result.valid.tolist() == [True, True, True, False, False]
    assert result.scores[:3].tolist() == [1.0, 0.0, 1.0]
    assert result.info == {"correct": 2 / 3, "invalid": 2.0}


def test_partial_credit_and_registry():
    meta = draw_sample_meta("t2i", "reasoning", "eval", 0, 0)
    wrong = dict(meta["spec"], objects=[dict(meta["spec"]["objects"][0], shape="square")])
    if meta["spec"]["objects"][0]["shape"] == "square":
        wrong["objects"][0]["shape"] = "circle"
    reward = build_reward("tiny_world")
    result = reward([np.asarray(render_scene(wrong))], [meta["caption"]], [meta], [0])
    assert result.valid.all() and 0 < result.scores[0] < 1
    assert reward.name == "tiny_world"
