"""Stacked Channel Bridging (SCB): six VLM hidden-state layers -> DiT text conditioning.

The stacked states ``[B, L, 6*H]`` go through a linear fuse, a pre-LN bidirectional encoder (SigLIP
style: no positional embedding, no final norm) and two zero-initialised heads: a sequence head to
the DiT's ``joint_attention_dim`` and a pooled head (mean over tokens) to ``pooled_projection_dim``.
Zero heads make training start from an "empty conditioning" DiT, as in the original.

Deliberate change from the original: with ``mask_padding`` the left padding is masked out of the
encoder's attention and out of the pooled mean. ``mask_padding=False`` reproduces the original.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class ConnectorAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"Connector hidden size {hidden} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        heads = [
            p(x).view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        ]
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        out = F.scaled_dot_product_attention(*heads, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ConnectorMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ConnectorLayer(nn.Module):
    def __init__(self, hidden: int, num_heads: int, intermediate: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attn = ConnectorAttention(hidden, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = ConnectorMLP(hidden, intermediate)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class SCBBridge(nn.Module):
    """Fuse -> connector encoder -> (sequence head, pooled head)."""

    def __init__(
        self,
        vlm_hidden: int,
        num_fusion_layers: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        joint_attention_dim: int,
        pooled_projection_dim: int,
        mask_padding: bool = True,
    ) -> None:
        super().__init__()
        self.mask_padding = mask_padding
        self.fuse = nn.Linear(num_fusion_layers * vlm_hidden, vlm_hidden)
        self.layers = nn.ModuleList(
            ConnectorLayer(vlm_hidden, num_heads, intermediate_size) for _ in range(num_layers)
        )
        self.seq_head = nn.Linear(vlm_hidden, joint_attention_dim)
        self.pooled_head = nn.Linear(vlm_hidden, pooled_projection_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation of the original connector; both heads start at exactly zero."""
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2):
                nn.init.xavier_uniform_(lin.weight)
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                nn.init.zeros_(lin.bias)
            nn.init.normal_(mlp.fc1.bias, std=1e-6)
            nn.init.normal_(mlp.fc2.bias, std=1e-6)
        for head in (self.seq_head, self.pooled_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        bound = 1 / math.sqrt(self.fuse.in_features)
        nn.init.uniform_(self.fuse.weight, -bound, bound)
        nn.init.uniform_(self.fuse.bias, -bound, bound)

    def forward(self, stacked: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Args:
            stacked: ``[B, L, num_fusion_layers * H]`` concatenated VLM hidden states.
            attention_mask: ``[B, L]``, 1 for real tokens (think tokens included), 0 for padding.

        Returns:
            Sequence conditioning ``[B, L, joint_attention_dim]`` and pooled ``[B, pooled_projection_dim]``.
        """
        valid = attention_mask.bool() if self.mask_padding else None
        h = self.fuse(stacked)
        for layer in self.layers:
            h = layer(h, valid)
        if valid is None:
            pooled = h.mean(dim=1)
        else:
            weights = valid.to(h.dtype).unsqueeze(-1)
            pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return self.seq_head(h), self.pooled_head(pooled)
