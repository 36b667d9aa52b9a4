import torch

from deepgen.model.bridge import SCBBridge


def make_bridge(mask_padding: bool) -> SCBBridge:
    torch.manual_seed(0)
    bridge = SCBBridge(
        vlm_hidden=16,
        num_fusion_layers=6,
        num_layers=2,
        num_heads=4,
        intermediate_size=32,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        mask_padding=mask_padding,
    )
    for head in (bridge.seq_head, bridge.pooled_head):  # non-zero heads so the outputs carry information
        torch.nn.init.normal_(head.weight)
    return bridge


def test_heads_start_at_zero():
    bridge = SCBBridge(16, 6, 1, 4, 32, 24, 12)
    seq, pooled = bridge(torch.randn(2, 5, 96), torch.ones(2, 5))
    assert seq.shape == (2, 5, 24) and pooled.shape == (2, 12)
    assert seq.abs().max() == 0 and pooled.abs().max() == 0


def test_masked_padding_does_not_leak():
    stacked = torch.randn(1, 5, 96)
    padded = torch.cat([torch.randn(1, 3, 96) * 50, stacked], dim=1)  # garbage in 3 left-pad slots
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    bridge = make_bridge(mask_padding=True)
    seq_alone, pooled_alone = bridge(stacked, torch.ones(1, 5))
    seq_pad, pooled_pad = bridge(padded, mask)
    torch.testing.assert_close(seq_pad[:, 3:], seq_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_pad, pooled_alone, atol=1e-5, rtol=1e-5)


def test_original_behaviour_pools_over_padding():
    stacked = torch.randn(1, 5, 96)
    padded = torch.cat([torch.randn(1, 3, 96) * 50, stacked], dim=1)
    bridge = make_bridge(mask_padding=False)
    _, pooled_alone = bridge(stacked, torch.ones(1, 5))
    _, pooled_pad = bridge(padded, torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    assert not torch.allclose(pooled_pad, pooled_alone, atol=1e-3)


def test_real_size_bridge_has_the_original_parameter_count():
    with torch.device("meta"):
        bridge = SCBBridge(2048, 6, 6, 32, 11946, 4096, 2048)
    counts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in bridge.named_children()}
    assert abs(counts["layers"] - 394.4e6) < 0.1e6  # connector
    assert abs(counts["fuse"] - 25.2e6) < 0.1e6  # projector_1
    assert abs(counts["pooled_head"] - 4.2e6) < 0.1e6  # projector_2
    assert abs(counts["seq_head"] - 8.4e6) < 0.1e6  # projector_3
    think_tokens = 128 * 2048
    assert abs(sum(counts.values()) + think_tokens - 432e6) < 1e6
