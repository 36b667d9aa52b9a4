"""Per-block torch.compile (hardware.compile): same losses and gradients as eager, alone and under
FSDP2 with activation checkpointing. The tests trace with the "aot_eager" backend: the same graphs
and autograd as inductor without generating kernels, which would take minutes on 2 CPU cores."""

import copy

import torch

import stages.parallel
from deepgen.config import HardwareConfig
from stages.parallel import compile_blocks, make_strategy, repeated_blocks, shard_backbone
from stages.sft import JointSFTModule
from tests.stages.test_fsdp_cpu import full, losses, mesh, open_bridge, stage_cfg  # noqa: F401 (fixture)


def backbones(tiny_model_cfg):
    module = JointSFTModule(tiny_model_cfg, stage_cfg(), max_steps=1)
    module.configure_model()
    bb = open_bridge(module.backbone)
    return bb, copy.deepcopy(bb)


def assert_same_losses_and_grads(bb, reference) -> None:
    for loss, ref in zip(losses(bb), losses(reference), strict=True):
        torch.testing.assert_close(loss, ref)
        loss.backward()
        ref.backward()
    compiled = dict(bb.named_parameters())
    checked = 0
    for name, param in reference.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(full(compiled[name].grad), param.grad, msg=name)
            checked += 1
    assert checked > 100


def test_compiled_blocks_match_eager(tiny_model_cfg):
    bb, reference = backbones(tiny_model_cfg)
    names = [n for n, _ in bb.named_parameters()]
    compile_blocks(bb, backend="aot_eager")
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in repeated_blocks(bb))
    assert [n for n, _ in bb.named_parameters()] == names  # compiled in place: checkpoint keys unchanged
    assert_same_losses_and_grads(bb, reference)


def test_sharding_checkpoints_then_compiles(tiny_model_cfg, mesh, monkeypatch):  # noqa: F811
    calls = []

    def traced(backbone, backend="inductor"):
        calls.append(all(b._forward_hooks for b in repeated_blocks(backbone)))  # checkpoint hooks first
        compile_blocks(backbone, backend="aot_eager")

    monkeypatch.setattr(stages.parallel, "compile_blocks", traced)
    bb, reference = backbones(tiny_model_cfg)
    shard_backbone(bb, mesh, activation_checkpointing=True, mixed_precision=False, compile=True)
    assert calls == [True]
    assert_same_losses_and_grads(bb, reference)


def test_the_strategy_takes_the_hardware_setting():
    assert make_strategy(HardwareConfig(strategy="fsdp2", compile=True)).compile
    assert not make_strategy(HardwareConfig(strategy="fsdp2")).compile
