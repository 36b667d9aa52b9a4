"""MR-GRPO advantages: each reward normalised within its group, mixed, then normalised globally.

For a batch of N images in groups (one group = the images of one prompt):

1. For every reward k separately, within each group g over the samples where k is valid:
   A_k = (r_k - mean_g) / (std_g + eps), std unbiased. A group with fewer than two valid samples
   gives no advantage for k; a group whose scores are all equal gives 0 (counted as "zero std").
2. A = sum_k w[set(i), k] * A_k(i), the weights of the prompt set the sample came from. A sample
   that no weighted reward could score is masked out of the loss.
3. A = (A - mean) / (std + eps) over the masked samples of the **global** batch (sums reduced over
   all ranks: the original used one GPU's 4 groups), then clipped to +-clip.

Invalid scores (a reward that failed) are left out of every statistic: never counted as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class GroupAdvantage:
    advantage: Tensor  # [N], 0 where not usable
    usable: Tensor  # [N] bool: the sample was valid and its group had >= 2 valid samples
    zero_std_groups: int  # groups whose valid scores were all equal
    groups: int  # groups with >= 2 valid samples


def group_normalise(scores: Tensor, valid: Tensor, group_ids: Tensor, eps: float = 1e-4) -> GroupAdvantage:
    """Step 1 for one reward: ``scores``/``valid``/``group_ids`` are ``[N]``."""
    scores = scores.double()
    advantage = torch.zeros_like(scores)
    usable = torch.zeros_like(valid, dtype=torch.bool)
    zero_std = groups = 0
    for g in torch.unique(group_ids):
        members = (group_ids == g) & valid
        if members.sum() < 2:
            continue
        r = scores[members]
        std = r.std(unbiased=True)
        if std > 0:
            advantage[members] = (r - r.mean()) / (std + eps)
        usable |= members
        groups += 1
        zero_std += int(std == 0)
    return GroupAdvantage(advantage, usable, zero_std, groups)


def combine(per_reward: dict[str, GroupAdvantage], weights: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Step 2: ``weights[k]`` is ``[N]``, the weight of reward k in each sample's prompt set.

    Returns the combined advantage and the mask of samples at least one weighted reward scored."""
    n = next(iter(weights.values())).shape[0]
    total = torch.zeros(n, dtype=torch.float64)
    mask = torch.zeros(n, dtype=torch.bool)
    for name, w in weights.items():
        w = w.double()
        part = per_reward[name]
        counts = part.usable & (w != 0)
        total += torch.where(counts, w * part.advantage, torch.zeros_like(total))
        mask |= counts
    return total, mask


def global_normalise(advantage: Tensor, mask: Tensor, clip: float, eps: float = 1e-4) -> Tensor:
    """Step 3: normalise over the masked samples of every rank, clip; unmasked samples get 0."""
    a = advantage.double()
    m = mask.double()
    stats = torch.stack([(a * m).sum(), (a * a * m).sum(), m.sum()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    total, total_sq, count = stats.tolist()
    if count < 2:
        return torch.zeros_like(a)
    mean = total / count
    var = max(0.0, (total_sq - count * mean * mean) / (count - 1))
    normalised = ((a - mean) / (var**0.5 + eps)).clamp(-clip, clip)
    return torch.where(mask, normalised, torch.zeros_like(normalised))
