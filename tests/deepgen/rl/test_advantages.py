"""MR-GRPO advantages against hand-computed values, and global statistics across 2 processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepgen.rl.advantages import combine, global_normalise, group_normalise

GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])
R3 = 1 / math.sqrt(3)


def test_group_normalise_by_hand():
    out = group_normalise(torch.tensor([1.0, 2, 3, 5, 5, 5]), torch.ones(6, dtype=torch.bool), GROUPS, eps=0)
    # group 0: mean 2, unbiased std 1; group 1: all equal -> 0 and counted as zero std
    assert out.advantage.tolist() == pytest.approx([-1, 0, 1, 0, 0, 0])
    assert out.usable.all()
    assert (out.zero_std_groups, out.groups) == (1, 2)


def test_invalid_scores_are_left_out_not_zeroed():
    scores = torch.tensor([1.0, 99.0, 3.0, 7.0, 0.0, 0.0])
    valid = torch.tensor([True, False, True, True, False, False])
    out = group_normalise(scores, valid, GROUPS, eps=0)
    # group 0 uses 1 and 3 only (99 is invalid): mean 2, std sqrt(2); group 1 has one valid sample
    assert out.advantage.tolist() == pytest.approx([-1 / math.sqrt(2), 0, 1 / math.sqrt(2), 0, 0, 0])
    assert out.usable.tolist() == [True, False, True, False, False, False]
    assert (out.zero_std_groups, out.groups) == (0, 1)


def combined_example() -> tuple[torch.Tensor, torch.Tensor]:
    ones = torch.ones(6, dtype=torch.bool)
    per = {
        "a": group_normalise(torch.tensor([1.0, 2, 3, 5, 5, 5]), ones, GROUPS, eps=0),
        "b": group_normalise(torch.tensor([0.0, 0, 3, 1, 2, 3]), ones, GROUPS, eps=0),
    }
    # prompt set of group 0 weights a 1.0, b 0.5; group 1's set weights only b
    weights = {"a": torch.tensor([1.0, 1, 1, 0, 0, 0]), "b": torch.tensor([0.5, 0.5, 0.5, 1, 1, 1])}
    return combine(per, weights)


def test_combine_by_hand():
    total, mask = combined_example()
    # b, group 0: mean 1, std sqrt(3) -> [-1, -1, 2] / sqrt(3); group 1: [-1, 0, 1]
    expected = [-1 - 0.5 * R3, -0.5 * R3, 1 + R3, -1, 0, 1]
    assert total.tolist() == pytest.approx(expected)
    assert mask.all()


def test_global_normalise_by_hand():
    total, mask = combined_example()
    # the six values sum to 0; unbiased std = 1.1164274
    out = global_normalise(total, mask, clip=1.2, eps=0)
    assert out.tolist() == pytest.approx([-1.1542848, -0.2585705, 1.2, -0.8957143, 0, 0.8957143], abs=1e-6)


def test_masked_samples_get_zero_and_do_not_count():
    adv = torch.tensor([1.0, 3.0, 100.0])
    out = global_normalise(adv, torch.tensor([True, True, False]), clip=5, eps=0)
    assert out.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 0])


RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from test_advantages import combined_example
from deepgen.rl.advantages import global_normalise
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
total, mask = combined_example()
part = slice(0, 3) if rank == 0 else slice(3, 6)  # each rank holds one group
print(json.dumps(global_normalise(total[part], mask[part], clip=1.2, eps=0).tolist()))
dist.destroy_process_group()
"""


def test_two_ranks_normalise_over_the_global_batch(tmp_path):
    here = str(Path(__file__).parent)
    cmd = [sys.executable, "-c", RANK_SCRIPT]
    procs = [
        subprocess.Popen([*cmd, str(r), str(tmp_path / "store"), here], stdout=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    total, mask = combined_example()
    single = global_normalise(total, mask, clip=1.2, eps=0).tolist()
    assert results[0] + results[1] == pytest.approx(single, abs=1e-9)
    # a rank alone would normalise its own group differently: the statistics really are global
    alone = global_normalise(total[:3], mask[:3], clip=1.2, eps=0).tolist()
    assert alone != pytest.approx(results[0], abs=1e-3)
