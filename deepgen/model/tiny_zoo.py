"""A tiny model zoo: miniature Qwen2.5-VL and SD3.5 directories, built locally on first use.

The directories have the same layouts as the real ``Qwen/Qwen2.5-VL-3B-Instruct`` and
``stabilityai/stable-diffusion-3.5-medium`` repositories, so the project's real loading code runs on
them without a network or a model hub. Everything is random-initialised from fixed seeds except the
tokenizer (a byte-level BPE trained on tiny-world language), the VAE (fitted on tiny-world images,
so latents carry the picture and decoded samples look like the training data) and the Qwen2.5-VL
language model (briefly pretrained as a causal LM on tiny-world chats, see :func:`pretrain_vlm`, so
that, like the real pretrained VLM, its hidden states carry what the prompt asks for).

    root/
      manifest.json          written last: its presence means the build is complete
      qwen2_5_vl/            tokenizer files, chat_template.jinja, preprocessor_config.json,
                             config.json, generation_config.json, model.safetensors
      sd3/                   model_index.json, transformer/, vae/, scheduler/
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# 2: VLM initializer_range 0.15 and causal-LM pretraining; 3: VAE fit 800 steps at lr 2e-3
BUILDER_VERSION = 3
SEED = 1234

VLM_SUBDIR = "qwen2_5_vl"
DIT_SUBDIR = "sd3"
MANIFEST = "manifest.json"

# ---- Sizes, all in one place -------------------------------------------------------------------

TOKENIZER_VOCAB_SIZE = 1000  # upper bound on the BPE vocabulary (256 byte symbols + merges) before specials
VOCAB_MULTIPLE = 64  # the model's embedding rows are len(tokenizer) rounded up to this

VLM_TEXT = {
    "hidden_size": 64,
    "num_hidden_layers": 12,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "rope_theta": 1_000_000.0,
    "mrope_section": [2, 3, 3],  # sums to head_dim / 2 = 8
    # Qwen's 0.02 leaves a 12-layer, width-64 model near the identity: tiny token embeddings, uniform
    # attention, and a causal LM that does not learn to copy from its prompt in a minute. 0.15 does.
    "initializer_range": 0.15,
}
VLM_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": 64,
    "out_hidden_size": 64,  # must equal the text hidden size
    "fullatt_block_indexes": [1],
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
}
DIT = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 8,  # width 128: twice the VLM's, for sharper shapes at ~15% more step time
    "joint_attention_dim": 64,
    "caption_projection_dim": 128,  # must equal attention_head_dim * num_attention_heads
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 32,
    "dual_attention_layers": [0, 1],
    "qk_norm": "rms_norm",
}
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 64, 64],  # 4 blocks -> 8x downsampling, as in SD3
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": 64,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
VAE_FIT = {
    "image_size": 64,
    "train_images": 3072,
    "heldout_images": 256,
    "crop_size": 32,  # train on random crops: 4x cheaper than full images, and the VAE is convolutional
    "batch_size": 32,
    "lr": 2e-3,
    "kl_weight": 1e-6,
    "warmup_steps": 20,
}
DEFAULT_VAE_FIT_STEPS = 800
"""The VAE bounds every model's benchmark score: the tiny-world scorer gives its reconstructions of the
held-out renders 0.50 (general T2I) after 300 steps at lr 1e-3, and 0.92 after 600 at lr 2e-3."""
VLM_PRETRAIN = {
    "chats": 4096,  # tiny-world T2I chats drawn once; batches are sampled from them
    "category_weights": {"general": 6, "reasoning": 2, "text_rendering": 1},
    "batch_size": 16,
    "lr": 5e-3,
    "warmup_steps": 50,
}
DEFAULT_VLM_PRETRAIN_STEPS = 500  # about a minute on one CPU core

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"

# Qwen2's pre-tokenizer split: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newlines, whitespace.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2.5-VL chat template: a default system turn unless the first message is one, images and
# videos as vision blocks (optionally numbered), and an optional assistant header at the end.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}\n"
    "{%- set video_count = namespace(value=0) -%}\n"
    "{%- for message in messages -%}\n"
    "    {%- if loop.first and message['role'] != 'system' -%}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}\n"
    "    {%- endif -%}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{- message['content'] -}}\n"
    "    {%- else -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}\n"
    "                {%- set image_count.value = image_count.value + 1 -%}\n"
    "                {%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}\n"
    "                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n"
    "            {%- elif item['type'] == 'video' or 'video' in item -%}\n"
    "                {%- set video_count.value = video_count.value + 1 -%}\n"
    "                {%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}\n"
    "                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
    "            {%- elif 'text' in item -%}\n"
    "                {{- item['text'] -}}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- endif -%}\n"
    "    {{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": 12845056,
    "merge_size": VLM_VISION["spatial_merge_size"],
    "min_pixels": 3136,
    "patch_size": VLM_VISION["patch_size"],
    "processor_class": "Qwen2_5_VLProcessor",
    "resample": 3,
    "rescale_factor": 1 / 255,
    "temporal_patch_size": VLM_VISION["temporal_patch_size"],
}


@dataclass(frozen=True)
class TinyZoo:
    vlm_dir: Path
    dit_dir: Path
    manifest: dict


class ZooBuildError(RuntimeError):
    """A freshly built part did not load back or behave as the real model would."""


# ---- Entry point ---------------------------------------------------------------------------------


def builder_settings(vae_fit_steps: int, vlm_pretrain_steps: int = DEFAULT_VLM_PRETRAIN_STEPS) -> dict:
    """Everything that determines the build's output; its hash decides whether a cache is reusable."""
    return {
        "builder_version": BUILDER_VERSION,
        "seed": SEED,
        "tokenizer_vocab_size": TOKENIZER_VOCAB_SIZE,
        "vocab_multiple": VOCAB_MULTIPLE,
        "vlm_text": VLM_TEXT,
        "vlm_vision": VLM_VISION,
        "dit": DIT,
        "scheduler": SCHEDULER,
        "vae": VAE,
        "vae_fit": VAE_FIT,
        "vae_fit_steps": vae_fit_steps,
        "vlm_pretrain": VLM_PRETRAIN,
        "vlm_pretrain_steps": vlm_pretrain_steps,
    }


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(root: Path) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_tiny_zoo(
    root: Path,
    *,
    vae_fit_steps: int = DEFAULT_VAE_FIT_STEPS,
    vlm_pretrain_steps: int = DEFAULT_VLM_PRETRAIN_STEPS,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> TinyZoo:
    """Return the tiny zoo under `root`, building it first unless a complete build with the same settings exists.

    `vlm_pretrain_steps`: causal-LM steps of the VLM (0 = random weights); tests cut it and `vae_fit_steps`.

    The build goes into a temporary sibling directory that is renamed into place only once complete
    (manifest written last), so an interrupted build never looks finished.
    """
    root = Path(root).absolute()
    settings = builder_settings(vae_fit_steps, vlm_pretrain_steps)
    digest = settings_hash(settings)
    existing = read_manifest(root)
    if not force and existing is not None and existing.get("settings_hash") == digest:
        return _zoo(root, existing)

    minutes = max(1, round((30 + vae_fit_steps * 0.35 + vlm_pretrain_steps * 0.15) / 60))
    log(f"Building tiny model zoo in {root} (first use, about {minutes} min)")
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.building-{os.getpid()}-{time.time_ns()}"
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            manifest = _build_into(tmp, settings, digest, vae_fit_steps, vlm_pretrain_steps, log)
            manifest["build_seconds"] = round(time.perf_counter() - start, 1)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(tmp, root, digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = read_manifest(root)
    log(
        f"Tiny model zoo ready in {time.perf_counter() - start:.0f} s "
        f"(VAE held-out PSNR {manifest['vae']['heldout_psnr_db']:.1f} dB)"
    )
    return _zoo(root, manifest)


def _zoo(root: Path, manifest: dict) -> TinyZoo:
    return TinyZoo(vlm_dir=root / VLM_SUBDIR, dit_dir=root / DIT_SUBDIR, manifest=manifest)


def _check_replaceable(root: Path) -> None:
    """Refuse to delete a directory that is not (an old version of) a tiny zoo."""
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory; cannot build the tiny model zoo there")
    ours = {MANIFEST, VLM_SUBDIR, DIT_SUBDIR}
    foreign = [p.name for p in root.iterdir() if p.name not in ours]
    if foreign:
        raise FileExistsError(
            f"{root} holds files that are not part of a tiny model zoo ({', '.join(sorted(foreign)[:5])}); "
            "choose an empty or new directory"
        )


def _move_into_place(tmp: Path, root: Path, digest: str) -> None:
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(root, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process finished the same build first: keep theirs if it matches.
        other = read_manifest(root)
        if other is None or other.get("settings_hash") != digest:
            raise


def _build_into(
    tmp: Path,
    settings: dict,
    digest: str,
    vae_fit_steps: int,
    vlm_pretrain_steps: int,
    log: Callable[[str], None],
) -> dict:
    vlm_dir, dit_dir = tmp / VLM_SUBDIR, tmp / DIT_SUBDIR
    vlm_dir.mkdir(parents=True)
    dit_dir.mkdir(parents=True)

    log("  tokenizer: training byte-level BPE on tiny-world language")
    token_ids = build_tokenizer(vlm_dir)
    log(f"  tokenizer: {token_ids['vocab_size_with_specials']} tokens")

    log(f"  Qwen2.5-VL: random init, {vlm_pretrain_steps} causal-LM steps on tiny-world chats, save")
    vlm_info = build_vlm(vlm_dir, token_ids, vlm_pretrain_steps, log)

    log("  SD3.5 DiT and scheduler: random init and save")
    build_dit(dit_dir)

    log(f"  VAE: fitting on tiny-world images for {vae_fit_steps} steps")
    vae_info = build_vae(dit_dir / "vae", vae_fit_steps, log)

    import diffusers
    import tokenizers
    import transformers

    return {
        "builder_version": BUILDER_VERSION,
        "settings_hash": digest,
        "settings": settings,
        "tokens": token_ids,
        "vlm": vlm_info,
        "vae": vae_info,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers": diffusers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }


# ---- 1. Tokenizer --------------------------------------------------------------------------------

_SHAPES = ["circle", "square", "triangle"]
_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
_SIZES = ["small", "large"]
_PLACES = ["left", "right", "above", "below", "top", "bottom", "center", "middle", "top left", "bottom right"]
_FILLER = (
    "You are a helpful assistant. The image shows a picture of a simple scene with one, two or three "
    "objects on a white background. There is a shape here and another one there. Please describe what "
    "you see and answer the question. What colour is it? Which object is bigger? How many shapes are "
    "there? It is next to the other one, near the edge, in the corner, between them. Make it bigger, "
    "smaller, brighter or darker. Replace the object with something else and keep the rest the same. "
    "This is a test of the system; the answer should be short, clear and correct. Thank you!\n"
    "A model reads the text and draws the image, then it learns from its mistakes. The first step is to "
    "look at the picture, find every shape and name its colour, size and position. When you edit an image, "
    "change only what the instruction asks for: if it says to move the circle up, the square should stay "
    "where it was. Good images have clean edges, flat colours and no noise. Count the objects, compare "
    "their sizes, and check that each one is where the caption puts it. Would you like to try again? Yes, "
    "no, maybe, always, never, sometimes, first, second, third, last, both, each, every, all, none, some, "
    "many, few, more, less, most, least, same, different, inside, outside, behind, front, under, over.\n"
    "def main():\n    return {'image': [1, 2, 3], \"text\": None}  # code, numbers 3.14 and 2025-01-01"
)


def tokenizer_corpus(seed: int = SEED) -> list[str]:
    """Sentences in tiny-world language, so that its words become single tokens."""
    rng = random.Random(seed)

    def thing() -> str:
        return f"{rng.choice(_SIZES)} {rng.choice(_COLOURS)} {rng.choice(_SHAPES)}"

    lines = [_FILLER] * 3
    for _ in range(1500):
        kind = rng.randrange(6)
        if kind == 0:
            lines.append(f"Generate an image: a {thing()} at the {rng.choice(_PLACES)}.")
        elif kind == 1:
            lines.append(f"Make the {rng.choice(_COLOURS)} {rng.choice(_SHAPES)} {rng.choice(_SIZES)}er")
        elif kind == 2:
            lines.append(f"Remove the {thing()}. Add a {thing()} {rng.choice(_PLACES)} it.")
        elif kind == 3:
            lines.append(f"Move the {thing()} to the {rng.choice(_PLACES)}")
        elif kind == 4:
            lines.append(f"Change the {thing()} into a {thing()}")
        else:
            lines.append(f"There are {rng.randint(0, 9)} shapes: {rng.randint(10, 99)} {thing()}s in a row")
    lines.append(" ".join("0123456789") + " " + "0123456789")
    lines.append(" ".join("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    lines.append(". , ; : ! ? ' \" ( ) [ ] { } - + = * / \\ _ < > | @ # $ % ^ & ~ `")
    return lines


def build_tokenizer(vlm_dir: Path) -> dict:
    """Train the BPE, write the Qwen2 tokenizer files and chat template; return the special token ids."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    bpe_size = tok.get_vocab_size()
    # Specials come after the BPE vocabulary, in Qwen's order, each one id.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(vlm_dir / "tokenizer.json"))
    tok.model.save(str(vlm_dir))  # vocab.json + merges.txt, as in the real repository

    first = bpe_size
    added = {
        str(first + i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(vlm_dir / "tokenizer_config.json", tokenizer_config)
    (vlm_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    _write_json(vlm_dir / "preprocessor_config.json", PREPROCESSOR_CONFIG)

    loaded = AutoTokenizer.from_pretrained(vlm_dir)
    ids = {t: loaded.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    expected = {t: first + i for i, t in enumerate(SPECIAL_TOKENS)}
    if ids != expected:
        raise ZooBuildError(f"special token ids after reload {ids} differ from {expected}")
    sample = "Generate an image: a small red circle — ünïcødé 🙂\n\tok"
    if loaded.decode(loaded(sample)["input_ids"]) != sample:
        raise ZooBuildError("the tokenizer does not round-trip text")
    if loaded.pad_token_id != ids[PAD_TOKEN] or loaded.eos_token_id != ids[EOS_TOKEN]:
        raise ZooBuildError("pad/eos tokens did not survive reloading")
    return {
        "bpe_vocab_size": bpe_size,
        "vocab_size_with_specials": len(loaded),
        "special_token_ids": ids,
    }


# ---- 2. Qwen2.5-VL ------------------------------------------------------------------------------


def vlm_config(token_ids: dict):
    from transformers import Qwen2_5_VLConfig

    ids = token_ids["special_token_ids"]
    vocab = math.ceil(token_ids["vocab_size_with_specials"] / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text = dict(VLM_TEXT)
    rope = {
        "rope_type": "default",
        "rope_theta": text.pop("rope_theta"),
        "mrope_section": text.pop("mrope_section"),
    }
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **text,
            vocab_size=vocab,
            rope_parameters=rope,
            bos_token_id=ids[PAD_TOKEN],
            eos_token_id=ids[EOS_TOKEN],
            pad_token_id=ids[PAD_TOKEN],
            tie_word_embeddings=True,
        ),
        vision_config=dict(VLM_VISION),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    # The top-level value initialises the parts owned by the top-level model (the tied LM head).
    config.initializer_range = VLM_TEXT["initializer_range"]
    return config


def build_vlm(
    vlm_dir: Path,
    token_ids: dict,
    pretrain_steps: int = DEFAULT_VLM_PRETRAIN_STEPS,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Init the VLM from a fixed seed, pretrain its language model briefly, save it, check it reloads identically."""
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    config = vlm_config(token_ids)
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    start = time.perf_counter()
    losses = pretrain_vlm(model, AutoTokenizer.from_pretrained(vlm_dir), pretrain_steps, log=log)
    pretrain_seconds = time.perf_counter() - start
    ids = token_ids["special_token_ids"]
    model.generation_config = GenerationConfig(
        bos_token_id=ids[PAD_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        eos_token_id=[ids[EOS_TOKEN], ids[PAD_TOKEN]],
    )
    model.save_pretrained(vlm_dir)

    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm_dir).eval()
    before, after = model.state_dict(), loaded.state_dict()
    if before.keys() != after.keys() or any(not torch.equal(before[k], after[k]) for k in before):
        raise ZooBuildError("the saved Qwen2.5-VL does not load back with identical weights")
    with torch.no_grad():
        out = loaded(input_ids=torch.tensor([[1, 2, 3, 4]]), output_hidden_states=True)
    if len(out.hidden_states) != VLM_TEXT["num_hidden_layers"] + 1:
        raise ZooBuildError(
            f"expected {VLM_TEXT['num_hidden_layers'] + 1} hidden states, got {len(out.hidden_states)}"
        )
    Qwen2VLImageProcessorPil.from_pretrained(vlm_dir)
    window = max(1, min(20, len(losses) // 4))
    return {
        "vocab_size": config.text_config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_steps": pretrain_steps,
        "pretrain_seconds": round(pretrain_seconds, 1),
        "pretrain_loss_first": round(sum(losses[:window]) / window, 4) if losses else None,
        "pretrain_loss_last": round(sum(losses[-window:]) / window, 4) if losses else None,
    }


def vlm_pretrain_chats(count: int, seed: int = SEED + 5) -> list[str]:
    """Tiny-world T2I chats in the project's prompt format, answered with what the image must show.

    ``<|im_start|>user\nGenerate an image: {caption}<|im_end|>\n<|im_start|>assistant\n`` followed by
    "The image shows {objects}.<|im_end|>": the caption's description without its prefix template, the
    plain colour/shape for reasoning prompts ("a circle the colour of a ripe banana" -> "a yellow
    circle"), the canonical sign wording for text prompts. Only training-side prompts (holdout_split)
    are used, so held-out evaluation prompts stay unseen.
    """
    from deepgen.data.tiny_world import DRAWERS, holdout_split
    from deepgen.model.vlm import build_t2i_prompt

    rng = random.Random(seed)
    weights = VLM_PRETRAIN["category_weights"]
    chats: list[str] = []
    while len(chats) < count:
        category = rng.choices(list(weights), list(weights.values()))[0]
        description, meta = DRAWERS[("t2i", category)](rng, VAE_FIT["image_size"])
        if holdout_split(description) != "train":
            continue
        answer = meta.get("resolved_caption", description)
        chats.append(build_t2i_prompt(meta["caption"]) + f"The image shows {answer}.{EOS_TOKEN}\n")
    return chats


def warmup_cosine_schedule(
    opt: torch.optim.Optimizer, steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup (at most a quarter of the run), then cosine decay to 10%: the decay buys the VAE a
    few dB of PSNR at the end."""
    warmup = min(warmup_steps, max(1, steps // 4))

    def lr_scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_scale)


def pretrain_vlm(
    model,
    tokenizer,
    steps: int,
    *,
    seed: int = SEED + 6,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Train the language model (embeddings, decoder, tied head; not the vision tower) as a causal LM.

    Why: the real DeepGen VLM is pretrained, so its hidden states (and the think tokens reading them)
    carry what the prompt asks for. A random tiny VLM is an unfaithful stand-in: its states barely differ
    between captions, and an SFT run of a few hundred steps does not learn to follow prompts through it.
    A minute of next-token prediction on :func:`vlm_pretrain_chats` teaches it to repeat the requested
    objects after the assistant header (and the colour/shape facts of reasoning prompts). AdamW with
    linear warmup and cosine decay to 10%, fixed seeds; returns the per-step loss. ``steps=0`` keeps
    the random init.
    """
    if steps <= 0:
        return []
    cfg = VLM_PRETRAIN
    chats = vlm_pretrain_chats(cfg["chats"])
    gen = torch.Generator().manual_seed(seed)
    params = [p for n, p in model.named_parameters() if ".visual." not in f".{n}"]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    sched = warmup_cosine_schedule(opt, steps, cfg["warmup_steps"])
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    report_every = max(1, steps // 5)
    for step in range(steps):
        idx = torch.randint(len(chats), (cfg["batch_size"],), generator=gen).tolist()
        enc = tokenizer([chats[i] for i in idx], return_tensors="pt", padding=True, padding_side="right")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and ((step + 1) % report_every == 0 or step + 1 == steps):
            recent = sum(losses[-report_every:]) / len(losses[-report_every:])
            log(f"    LM step {step + 1}/{steps}: loss {recent:.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return losses


# ---- 3. SD3.5 DiT and scheduler ---------------------------------------------------------------


def build_dit(dit_dir: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from deepgen.model.loading import sd3_model_index

    torch.manual_seed(SEED + 1)
    transformer = SD3Transformer2DModel(
        **{**DIT, "dual_attention_layers": tuple(DIT["dual_attention_layers"])}
    )
    transformer.save_pretrained(dit_dir / "transformer")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(dit_dir / "scheduler")

    _write_json(dit_dir / "model_index.json", sd3_model_index())


# ---- 4. VAE -------------------------------------------------------------------------------------


def tiny_world_images(count: int, seed: int, size: int = VAE_FIT["image_size"]) -> torch.Tensor:
    """`count` random tiny-world scenes as a uint8 tensor (count, 3, size, size)."""
    from deepgen.data.tiny_world import random_scene, render_scene

    rng = random.Random(seed)
    arrays = [np.asarray(render_scene(random_scene(rng, size, size)), dtype=np.uint8) for _ in range(count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def random_crops(images: torch.Tensor, count: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """`count` random `size` x `size` crops of random images from a uint8 (N, 3, H, W) tensor."""
    height, width = images.shape[-2:]
    size = min(size, height, width)
    idx = torch.randint(len(images), (count,), generator=gen).tolist()
    ys = torch.randint(height - size + 1, (count,), generator=gen).tolist()
    xs = torch.randint(width - size + 1, (count,), generator=gen).tolist()
    return torch.stack(
        [images[i, :, y : y + size, x : x + size] for i, y, x in zip(idx, ys, xs, strict=True)]
    )


def new_vae(seed: int = SEED + 2):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE)


def fit_vae(
    vae,
    images: torch.Tensor,
    steps: int,
    *,
    seed: int = SEED + 3,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Train `vae` on uint8 `images` for `steps` AdamW steps (MSE + small KL); return the per-step MSE."""
    gen = torch.Generator().manual_seed(seed)
    batch = min(VAE_FIT["batch_size"], len(images))
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_FIT["lr"], weight_decay=0.0)
    sched = warmup_cosine_schedule(opt, steps, VAE_FIT["warmup_steps"])
    vae.train()
    losses: list[float] = []
    start = time.perf_counter()
    report_every = max(1, steps // 10)
    for step in range(steps):
        x = to_unit_range(random_crops(images, batch, VAE_FIT["crop_size"], gen))
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + VAE_FIT["kl_weight"] * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(mse.item())
        if log is not None and ((step + 1) % report_every == 0 or step + 1 == steps):
            recent = sum(losses[-report_every:]) / len(losses[-report_every:])
            psnr = 10 * math.log10(4.0 / max(recent, 1e-12))
            log(
                f"    VAE step {step + 1}/{steps}: train PSNR {psnr:.1f} dB ({time.perf_counter() - start:.0f} s)"
            )
    vae.eval()
    return losses


@torch.no_grad()
def evaluate_vae(vae, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Held-out PSNR (decoding the posterior mean) and latent statistics for shift/scaling factors."""
    means, samples, sq_err = [], [], 0.0
    gen = torch.Generator().manual_seed(SEED + 4)
    for i in range(0, len(images), batch_size):
        x = to_unit_range(images[i : i + batch_size])
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean)
        samples.append(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen))
        recon = vae.decode(posterior.mean).sample.clamp(-1, 1)
        sq_err += ((recon - x) ** 2).sum().item()
    mse = sq_err / images.numel()
    mean_latents, sample_latents = torch.cat(means), torch.cat(samples)
    return {
        "heldout_psnr_db": round(10 * math.log10(4.0 / max(mse, 1e-12)), 2),  # peak-to-peak range 2
        "heldout_mse": mse,
        "latent_mean": mean_latents.mean().item(),
        "latent_std": mean_latents.std().item(),
        "sample_latent_mean": sample_latents.mean().item(),
        "sample_latent_std": sample_latents.std().item(),
    }


def build_vae(vae_dir: Path, steps: int, log: Callable[[str], None]) -> dict:
    """Fit the VAE on tiny-world images, set shift/scaling factors from held-out latents, save it."""
    from diffusers import AutoencoderKL

    train = tiny_world_images(VAE_FIT["train_images"], seed=SEED + 10)
    heldout = tiny_world_images(VAE_FIT["heldout_images"], seed=SEED + 11)
    vae = new_vae()
    start = time.perf_counter()
    fit_vae(vae, train, steps, log=log)
    fit_seconds = time.perf_counter() - start
    stats = evaluate_vae(vae, heldout)
    # Statistics of latent_dist.mean over held-out images: (z - shift) * scale then has mean 0, std 1.
    shift, scale = stats["latent_mean"], 1.0 / max(stats["latent_std"], 1e-6)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.save_pretrained(vae_dir)
    log(f"  VAE: held-out PSNR {stats['heldout_psnr_db']:.1f} dB after {fit_seconds:.0f} s")

    loaded = AutoencoderKL.from_pretrained(vae_dir).eval()
    if loaded.config.scaling_factor != scale or loaded.config.shift_factor != shift:
        raise ZooBuildError("the VAE's scaling/shift factors did not survive saving")
    with torch.no_grad():
        wide = torch.zeros(1, 3, 32, 128)  # non-square, sides multiples of 8
        z = loaded.encode(wide).latent_dist.mean
        if z.shape != (1, VAE["latent_channels"], 4, 16) or loaded.decode(z).sample.shape != wide.shape:
            raise ZooBuildError(f"the VAE does not encode/decode a 128x32 image (latent {tuple(z.shape)})")
    return {
        **stats,
        "shift_factor": shift,
        "scaling_factor": scale,
        "factors_from": "latent_dist.mean over held-out images",
        "fit_steps": steps,
        "fit_seconds": round(fit_seconds, 1),
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
