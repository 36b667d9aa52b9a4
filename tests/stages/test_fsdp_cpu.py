"""FSDP2 sharding on CPU: which modules become units, parity with the unsharded model, and a 2-process
sharded SFT run (gloo) that saves a checkpoint and resumes from it."""

import copy
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch.distributed._composable import _get_registry
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from deepgen.config import LoraConfig, StageConfig
from deepgen.io.checkpoints import load_checkpoint_dir
from stages.checkpoint_io import SafeCheckpointIO
from stages.parallel import repeated_blocks, shard_backbone
from stages.sft import JointSFTModule


def stage_cfg() -> StageConfig:
    return StageConfig(name="sft", train_dit=True, lora=LoraConfig(rank=4, alpha=8, dropout=0.0))


@pytest.fixture
def mesh(tmp_path):
    """A 1-process gloo group: enough for FSDP2 to build its units and run forward and backward."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def losses(bb, seed: int = 0, edit: bool = True) -> list[torch.Tensor]:
    """A T2I and an edit loss with fixed noise (the edit prompt runs the vision tower)."""
    torch.manual_seed(seed)  # encode_references samples the VAE posterior from the global generator
    g = torch.Generator().manual_seed(seed)
    img = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    t2i = bb.flow_loss(bb.condition_t2i(["a red circle", "a blue square"]), img(2, 3, 32, 32), generator=g)
    if not edit:
        return [t2i]
    sources = [[img(3, 32, 32)], [img(3, 32, 32)]]
    cond = bb.condition_edit(["make it blue", "remove the circle"], sources)
    edit_loss = bb.flow_loss(cond, img(2, 3, 32, 32), bb.encode_references(sources), generator=g)
    return [t2i, edit_loss]


def open_bridge(bb):
    """Non-zero bridge heads: the zero-initialised ones stop every gradient to the VLM side."""
    with torch.no_grad():
        for head in (bb.bridge.seq_head, bb.bridge.pooled_head):
            head.weight.normal_(std=0.05)
    return bb


def test_shard_backbone_units_names_and_parity(tiny_model_cfg, mesh):
    module = JointSFTModule(tiny_model_cfg, stage_cfg(), max_steps=1)
    module.configure_model()
    bb = open_bridge(module.backbone)
    reference = copy.deepcopy(bb)
    names = module.trainable_names()

    shard_backbone(bb, mesh, activation_checkpointing=True, mixed_precision=False)

    blocks = repeated_blocks(bb)
    assert len(blocks) == 12 + 1 + 4  # decoder layers, connector layers, DiT blocks of the tiny zoo
    units = [*blocks, *bb.vlm.model.visual.blocks, bb.vlm.model.visual, bb.bridge, bb.dit, bb]
    assert all(isinstance(m, FSDPModule) for m in units)
    assert all("checkpoint" in _get_registry(b) for b in blocks)
    assert not isinstance(bb.vlm.lm_head, FSDPModule)  # tied to the embeddings: both live in the root
    assert isinstance(bb.think_tokens, DTensor)
    assert not any(isinstance(p, DTensor) for p in bb.vae.parameters())  # frozen VAE: replicated
    assert module.trainable_names() == names  # no wrapper modules: checkpoint keys do not change

    calls = []
    bb.dit.transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    for loss, ref in zip(losses(bb), losses(reference), strict=True):
        torch.testing.assert_close(loss, ref)
        loss.backward()
        ref.backward()
    assert len(calls) == 4  # T2I and edit forwards, each run again in backward (activation checkpointing)
    sharded, plain = dict(bb.named_parameters()), dict(reference.named_parameters())
    for name, param in plain.items():
        if param.requires_grad and param.grad is not None:
            torch.testing.assert_close(full(sharded[name].grad), param.grad, msg=name)
    assert all(p.grad is None for p in bb.parameters() if not p.requires_grad)
    lora = [n for n, p in plain.items() if "lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0]
    assert plain["think_tokens"].grad.abs().sum() > 0 and len(lora) > 40


def test_mixed_precision_trains_and_samples(tiny_model_cfg, mesh):
    module = JointSFTModule(tiny_model_cfg, stage_cfg(), max_steps=1)
    module.configure_model()
    bb = open_bridge(module.backbone)
    shard_backbone(bb, mesh, activation_checkpointing=False, mixed_precision=True)
    loss = sum(
        losses(bb, edit=False)
    )  # no autocast needed: units cast their inputs, the DiT all but the timestep
    loss.backward()
    assert torch.isfinite(loss)
    for p in (bb.think_tokens, bb.dit.transformer_blocks[0].attn.to_q.weight):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32  # fp32 master weights and grads
        assert torch.isfinite(full(p.grad)).all() and full(p.grad).abs().sum() > 0
    with torch.no_grad():  # inference outside Lightning's training step (sample grids)
        images = bb.sample(bb.condition_t2i(["a red circle"]), bb.condition_t2i([""]), 32, 32, num_steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning as L
    import torch
    from torch.utils.data import DataLoader
    from deepgen.config import BridgeConfig, LoraConfig, ModelConfig, StageConfig
    from stages.checkpoint_io import SafeCheckpointIO
    from stages.parallel import FSDP2Strategy
    from stages.sft import JointSFTModule

    vlm_dir, dit_dir, out = sys.argv[1:]
    torch.set_num_threads(1)

    def batches(n, seed):
        g = torch.Generator().manual_seed(seed)
        img = lambda *s: torch.rand(*s, generator=g) * 2 - 1
        t2i = {"task": "t2i", "images": img(2, 3, 32, 32), "captions": ["a red circle", "a blue square"]}
        edit = {"task": "edit", "sources": [[img(3, 32, 32)], [img(3, 32, 32)]], "targets": img(2, 3, 32, 32),
                "instructions": ["make it blue", "remove the circle"]}
        return [(t2i, t2i, edit)[i % 3] for i in range(n)]

    class ShardedSFT(JointSFTModule):
        def configure_model(self):
            super().configure_model()
            if self.device_mesh is not None:
                self.trainer.strategy.shard(self.backbone)  # no-op once StageModule does it

        def train_dataloader(self):
            # Every rank runs the same task at each step (FSDP needs the same units), on its own samples.
            return DataLoader(batches(4, seed=self.global_rank)[self.first_step:], batch_size=None)

    def gathered(module):  # a collective: every rank calls it
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in module.named_parameters() if p.requires_grad}

    class AtResume(L.Callback):
        def on_train_start(self, trainer, pl_module):
            if trainer.global_step:
                state = {"step": trainer.global_step, "weights": gathered(pl_module),
                         "optimizer": trainer.strategy.optimizer_state(trainer.optimizers[0])}
                if trainer.is_global_zero:
                    torch.save(state, out + "/at_resume.pt")

    model_cfg = ModelConfig(name="tiny", vlm_path=vlm_dir, dit_path=dit_dir, num_think_tokens=4,
                            bridge=BridgeConfig(num_layers=1, num_heads=4, intermediate_size=64))
    stage_cfg = StageConfig(name="sft", train_dit=True, lora=LoraConfig(rank=4, alpha=8))

    def fit(steps, ckpt_path=None):
        module = ShardedSFT(model_cfg, stage_cfg, max_steps=10)
        module.first_step = 3 if ckpt_path else 0
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy=FSDP2Strategy(activation_checkpointing=True),
            max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, plugins=[SafeCheckpointIO()], default_root_dir=out,
            gradient_clip_val=1.0, use_distributed_sampler=False, callbacks=[AtResume()],
        )
        trainer.fit(module, ckpt_path=ckpt_path)
        return trainer, module

    trainer, module = fit(3)
    trainer.save_checkpoint(out + "/step=3.ckpt")
    saved = gathered(module)
    resumed_trainer, resumed = fit(4, out + "/step=3.ckpt")  # a second 2-process fit, from the checkpoint
    end = gathered(resumed)
    if trainer.is_global_zero:
        torch.save({"saved": saved, "end": end, "step": resumed_trainer.global_step}, out + "/result.pt")
    """
)


def test_two_process_sharded_training_saves_and_resumes(tiny_zoo, tiny_model_cfg, tmp_path):
    script = tmp_path / "train_fsdp.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, str(script), str(tiny_zoo.vlm_dir), str(tiny_zoo.dit_dir), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    # Every rank's first error lines, then the end: a crash on one rank shows up on the other as a reset.
    first_errors = "\n".join(
        line for line in result.stderr.splitlines() if "Error" in line and "File" not in line
    )
    assert result.returncode == 0, first_errors[:3000] + "\n...\n" + result.stderr[-2000:]

    ckpt = load_checkpoint_dir(tmp_path / "step=3.ckpt")
    out = torch.load(tmp_path / "result.pt")
    at_resume = torch.load(tmp_path / "at_resume.pt")
    saved = out["saved"]
    # one consolidated checkpoint of exactly the trainable weights, as gathered from the shards
    assert set(ckpt["state_dict"]) == set(saved)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in saved.items())
    # the resumed run starts at step 3 with the saved weights and optimizer state, and trains on
    assert at_resume["step"] == 3 and out["step"] == 4
    assert all(torch.equal(at_resume["weights"][k], v) for k, v in saved.items())
    optim_saved, optim_loaded = ckpt["optimizer_states"][0], at_resume["optimizer"]
    assert optim_saved["state"] and set(optim_saved["state"]) <= set(optim_loaded["state"])
    for i, state in optim_saved["state"].items():
        assert all(torch.equal(v, optim_loaded["state"][i][k]) for k, v in state.items())
    assert any(not torch.equal(out["end"][k], v) for k, v in saved.items())

    # the same checkpoint resumes without sharding: the format does not depend on the process count
    module = JointSFTModule(tiny_model_cfg, stage_cfg(), max_steps=10)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[SafeCheckpointIO()],
        default_root_dir=tmp_path,
    )
    batch = {"task": "t2i", "images": torch.rand(2, 3, 32, 32) * 2 - 1, "captions": ["a", "b"]}
    trainer.fit(
        module, torch.utils.data.DataLoader([batch], batch_size=None), ckpt_path=tmp_path / "step=3.ckpt"
    )
    assert trainer.global_step == 4
