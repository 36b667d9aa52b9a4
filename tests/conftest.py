"""Session fixtures: one tiny model zoo (barely fitted VAE and VLM: tests need layouts and shapes, not quality)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from deepgen.config import BridgeConfig, LoraConfig, ModelConfig, StageConfig
from deepgen.io.checkpoints import save_checkpoint_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    from deepgen.model.tiny_zoo import build_tiny_zoo

    return build_tiny_zoo(
        tmp_path_factory.mktemp("zoo"), vae_fit_steps=1, vlm_pretrain_steps=1, log=lambda *a, **k: None
    )


def tiny_model_config(zoo) -> ModelConfig:
    """The tests' model: the tiny zoo with 4 think tokens and a one-layer bridge."""
    return ModelConfig(
        name="tiny",
        vlm_path=str(zoo.vlm_dir),
        dit_path=str(zoo.dit_dir),
        num_think_tokens=4,
        bridge=BridgeConfig(num_layers=1, num_heads=4, intermediate_size=64),
    )


@pytest.fixture
def tiny_model_cfg(tiny_zoo) -> ModelConfig:
    torch.manual_seed(0)
    return tiny_model_config(tiny_zoo)


# Runs train.py with a signal sent to itself from inside training step `kill_at` (argv: kill_at signal args...).
SIGNAL_AT_STEP = """
import os, runpy, signal, sys
import stages.base
kill_at, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
step = stages.base.StageModule.training_step
def signalling_step(self, batch, batch_idx):
    if self.global_step == kill_at:
        os.kill(os.getpid(), sig)
    return step(self, batch, batch_idx)
stages.base.StageModule.training_step = signalling_step
sys.argv = ["train.py", *sys.argv[3:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.fixture
def train_cli(tiny_zoo):
    """Run `python train.py` on the tiny zoo with small, fast settings; later overrides win.

    With `signal_at=(step, "SIGKILL")` the process sends itself that signal during that training step.
    """

    def run(
        *overrides: str, timeout: int = 600, signal_at: tuple[int, str] | None = None
    ) -> subprocess.CompletedProcess:
        base = [
            "stage=sft",
            "logger=csv",
            f"model.vlm_path={tiny_zoo.vlm_dir}",
            f"model.dit_path={tiny_zoo.dit_dir}",
            "model.build_tiny_zoo=false",
            "data.num_workers=0",
            "data.batch_size=2",
            "sampling.num_steps=2",
        ]
        entry = ["-c", SIGNAL_AT_STEP, str(signal_at[0]), signal_at[1]] if signal_at else ["train.py"]
        cmd = [sys.executable, *entry, *base, *overrides]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    return run


def write_run(run_dir: Path, model_cfg: ModelConfig, lora: LoraConfig, state_dict: dict) -> Path:
    """Mirror a training run folder: config.yaml and checkpoints/step_000001.ckpt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "stage": {"name": "sft", "lora": dataclasses.asdict(lora)},
        "model": dataclasses.asdict(model_cfg),
    }
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    ckpt = run_dir / "checkpoints" / "step_000001.ckpt"
    save_checkpoint_dir({"state_dict": state_dict, "global_step": 1}, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def tiny_sft_run(tiny_zoo, tmp_path_factory):
    """An untrained SFT checkpoint (LoRA rank 4) in a folder laid out like a training run, with one
    reference_dit weight as a grpo checkpoint has (inference skips it). Returns (ckpt, state, module)."""
    from stages.sft import JointSFTModule

    torch.manual_seed(0)
    model_cfg = tiny_model_config(tiny_zoo)
    lora = LoraConfig(rank=4, alpha=8)
    module = JointSFTModule(model_cfg, StageConfig(name="sft", train_dit=True, lora=lora), max_steps=1)
    module.configure_model()
    kept = set(module.checkpoint_names())
    state = {n: p.detach().clone() for n, p in module.named_parameters() if n in kept}
    state["reference_dit.pos_embed.proj.bias"] = torch.zeros(1)
    run_dir = tmp_path_factory.mktemp("outputs") / "sft" / "2026-01-01_00-00-00"
    return write_run(run_dir, model_cfg, lora, state), state, module


# ---- Released DeepGen-1.0 naming, shared by the import tests and generate.py's test of imported weights.

# Our name -> the original's, written independently of the importer's table. The VLM part uses the older
# transformers layout (``lmm.model.*`` text model, ``lmm.visual.*``) to exercise the key-drift handling.
TO_ORIGINAL = (
    ("think_tokens", "meta_queries"),
    ("bridge.fuse.", "projector_1."),
    ("bridge.pooled_head.", "projector_2."),
    ("bridge.seq_head.", "projector_3."),
    ("bridge.layers.", "connector.layers."),
    ("dit.", "transformer."),
    ("vlm.model.language_model.", "lmm.model."),
    ("vlm.model.visual.", "lmm.visual."),
    ("vlm.lm_head.", "lmm.lm_head."),
)
CAPTIONS = ["a red circle", "a large blue square to the left of a green triangle"]


def to_original(state: dict, vlm: bool = True) -> dict:
    """A backbone state dict renamed as the released DeepGen-1.0 files name it (never the VAE)."""
    out = {}
    for key, value in state.items():
        if key.startswith("vae.") or (not vlm and key.startswith("vlm.")):
            continue  # the original never saves the VAE
        for ours, theirs in TO_ORIGINAL:
            if key == ours or (ours.endswith(".") and key.startswith(ours)):
                out[theirs + key[len(ours) :]] = value.clone()
                break
        else:
            raise AssertionError(f"test table has no entry for {key}")
    return out


def perturb(module, seed, prefixes=("",)):
    """Random-perturb every float parameter (zero-initialised heads included) so equality is not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(prefixes) and p.is_floating_point() and not name.startswith("vae."):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


def outputs(backbone):
    """Bridge conditioning and DiT velocity on fixed inputs."""
    with torch.no_grad():
        cond = backbone.condition_t2i(CAPTIONS)
        gen = torch.Generator().manual_seed(1)
        x_t = torch.randn((2, *backbone.latent_shape(32, 32)), generator=gen)
        v = backbone.velocity(x_t, torch.tensor([0.3, 0.8]), cond)
    return cond.seq, cond.pooled, v


def save_tiny_clip(path: Path) -> Path:
    """A random 2-layer CLIP with a character-level CLIP tokenizer and the PIL image processor."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


TINY_SHARDS = [
    "data.tiny_world.num_t2i=24",
    "data.tiny_world.num_edit=12",
    "data.tiny_world.samples_per_shard=12",
    "data.tiny_world.num_reasoning_t2i=6",
    "data.tiny_world.num_text_t2i=6",
    "data.tiny_world.num_reasoning_edit=3",
    "data.tiny_world.num_text_edit=3",
    "data.tiny_world.num_eval_per_split=2",
]
"""train.py overrides for tiny-world shards drawn in seconds (with data.shards_dir=<a temp folder>)."""
EVAL_PER_SPLIT = 2


@pytest.fixture(scope="module")
def tiny_eval_dir(tmp_path_factory) -> Path:
    """Held-out JSONL files, EVAL_PER_SPLIT samples per category, as write_tiny_world_shards lays them out."""
    from deepgen.data.tiny_world import EVAL_DIR, draw_sample_meta, sample_key
    from deepgen.eval.benchmark import CATEGORIES

    out = tmp_path_factory.mktemp("shards") / EVAL_DIR
    out.mkdir()
    for name in CATEGORIES:
        task, category = name.split("_", 1)
        lines = [
            json.dumps(
                {
                    **draw_sample_meta(task, category, "eval", 0, i),
                    "key": f"eval-{sample_key(task, category, i)}",
                }
            )
            for i in range(EVAL_PER_SPLIT)
        ]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out
