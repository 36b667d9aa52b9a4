import math

import torch

from stages.base import adamw_param_groups, warmup_cosine


def test_warmup_then_cosine_to_zero():
    steps = [warmup_cosine(s, 1000, 0.01) for s in range(1000)]
    assert steps[0] == 0.1 and steps[9] == 1.0  # 10 warmup steps, linear
    assert math.isclose(steps[10], 1.0)
    assert math.isclose(warmup_cosine(505, 1000, 0.01), 0.5, abs_tol=1e-9)  # half way through the cosine
    assert warmup_cosine(1000, 1000, 0.01) == 0.0
    assert all(a >= b for a, b in zip(steps[10:], steps[11:], strict=False))
    assert math.isclose(warmup_cosine(1000, 1000, 0.01, min_ratio=0.1), 0.1)


def test_weight_decay_only_on_matrices():
    lin, norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
    named = list(lin.named_parameters()) + list(norm.named_parameters())
    decay, no_decay = adamw_param_groups(named, 0.05)
    assert decay["weight_decay"] == 0.05 and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
