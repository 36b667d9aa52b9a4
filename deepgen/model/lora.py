"""LoRA on the VLM's language model, through peft, injected in place (module paths stay the same)."""

from __future__ import annotations

from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from torch import nn

from deepgen.config import LoraConfig


def attach_vlm_lora(vlm: nn.Module, cfg: LoraConfig) -> int:
    """Add LoRA adapters to the language model's linear layers; returns how many layers were adapted.

    The target names also occur in the vision tower's MLP (gate/up/down_proj), so the match is
    restricted to ``language_model``: the original never trains the vision tower.
    """
    pattern = r".*language_model.*\.(" + "|".join(cfg.target_modules) + ")$"
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=pattern,
        init_lora_weights="gaussian",
    )
    inject_adapter_in_model(peft_cfg, vlm)
    adapted = sum(1 for name, _ in vlm.named_modules() if name.endswith(".lora_A"))
    if adapted == 0:
        raise ValueError(f"LoRA matched no layer of the VLM's language model (targets: {cfg.target_modules})")
    return adapted
