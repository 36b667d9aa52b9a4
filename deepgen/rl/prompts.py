"""RL prompt sets: loading prompts with their metadata, and drawing them reproducibly.

A prompt set is a file (or webdataset shards) of prompts plus the reward weights that score it.
Draws depend only on (seed, step, rank), so a resumed run draws exactly the prompts the
uninterrupted run would have, with no sampler state to save.
"""

from __future__ import annotations

import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepgen.config import PromptSetConfig
from deepgen.data.resolution import fix_pixels_size
from deepgen.data.shards import resolve_shards


@dataclass
class Prompt:
    text: str
    set_name: str
    reward_weights: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)

    def size(self, image_size: int, unit: int = 32) -> tuple[int, int]:
        """(width, height) to generate at: the record's aspect ratio (its ``spec`` or ``width``/``height``)
        under the fix-pixels rule, square when the record has none."""
        source = self.metadata.get("spec", self.metadata)
        width, height = source.get("width", 1), source.get("height", 1)
        return fix_pixels_size(int(width), int(height), image_size, unit)


def _records_from_json(record: dict[str, Any], where: str) -> dict[str, Any]:
    text = record.get("prompt", record.get("caption"))
    if not isinstance(text, str):
        raise ValueError(f"{where}: a record has no 'prompt' or 'caption' string field")
    return {"prompt": text, **{k: v for k, v in record.items() if k not in ("prompt", "caption")}}


def read_prompt_records(path: str) -> list[dict[str, Any]]:
    """All records of a prompt file or shard set: dicts with a ``prompt`` and any other fields."""
    p = Path(path)
    if p.suffix == ".txt":
        return [{"prompt": line.strip()} for line in p.read_text().splitlines() if line.strip()]
    if p.suffix == ".jsonl":
        records = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(_records_from_json(json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not valid JSON: {e.msg}") from None
        return records
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [_records_from_json(r, path) for r in pq.read_table(p).to_pylist()]
    records = []
    for url in resolve_shards(path, "t2i"):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    records.append(_records_from_json(record, f"{url}/{member.name}"))
    return records


def load_prompt_set(cfg: PromptSetConfig) -> list[Prompt]:
    """The prompts of one set (filtered by ``category``); a missing file or empty set is an error."""
    if not Path(cfg.path).exists() and not any(ch in cfg.path for ch in "*?["):
        raise FileNotFoundError(f"prompt set '{cfg.name}': {cfg.path} does not exist")
    records = read_prompt_records(cfg.path)
    if cfg.category is not None:
        records = [r for r in records if r.get("category", "general") == cfg.category]
    if not records:
        raise ValueError(f"prompt set '{cfg.name}' has no prompts in {cfg.path} (category={cfg.category})")
    return [Prompt(r.pop("prompt"), cfg.name, dict(cfg.rewards), r) for r in records]


class PromptSampler:
    """Draws prompt sets with probability proportional to their weight, then a prompt uniformly."""

    def __init__(self, sets: list[list[Prompt]], weights: list[float], seed: int) -> None:
        if not sets or len(sets) != len(weights):
            raise ValueError("PromptSampler needs one weight per non-empty prompt set")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"prompt set weights must be >= 0 with a positive sum, got {weights}")
        self.sets = sets
        self.weights = weights
        self.seed = seed

    @classmethod
    def from_configs(cls, cfgs: list[PromptSetConfig], seed: int) -> PromptSampler:
        if not cfgs:
            raise ValueError("stage.grpo.prompt_sets is empty: RL needs at least one prompt set")
        return cls([load_prompt_set(c) for c in cfgs], [c.weight for c in cfgs], seed)

    def draw(self, step: int, rank: int, count: int) -> list[Prompt]:
        rng = random.Random(f"deepgen-rl-prompts/{self.seed}/{step}/{rank}")
        chosen = rng.choices(range(len(self.sets)), weights=self.weights, k=count)
        return [rng.choice(self.sets[i]) for i in chosen]
