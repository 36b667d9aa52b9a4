"""Import the released DeepGen-1.0 checkpoints (original naming) into a :class:`DeepGenBackbone`.

Original naming (``Qwen2p5VLStableDiffusion3HF`` in ``src/models/sd3_kontext/qwen2_5_vl_sd3_hf_dynamic_fusion.py``
of deepgenteam/deepgen, same names in deepgenteam/deepgen_rl) -> ours:

==========================================  ==========================================
``meta_queries``                            ``think_tokens``
``projector_1.{weight,bias}``               ``bridge.fuse.*``
``projector_2.{weight,bias}``               ``bridge.pooled_head.*``
``projector_3.{weight,bias}``               ``bridge.seq_head.*``
``connector.layers.N.<rest>``               ``bridge.layers.N.<rest>`` (same SigLIP-style leaf names)
``transformer.<rest>``                      ``dit.<rest>`` (stock diffusers SD3 names)
``lmm.<rest>``                              ``vlm.<rest>`` after the Qwen2.5-VL drift table below
``vae.*``, ``ema.*``                        ignored (VAE comes from the DiT directory; EMA copies unused)
==========================================  ==========================================

The original ``state_dict()`` drops every key containing ``vae.``, ``lmm.`` or ``ema.``, so its released files
normally hold only the bridge and the DiT; VLM keys (base weights or peft LoRA ``lora_A/lora_B``) can still
appear in files made from DeepSpeed optimizer states or HF-Trainer saves, and are handled here: LoRA pairs
load into our adapters when the backbone has the same ones, otherwise they are merged into the base weights
with ``scale = lora_alpha / r`` (the alpha is not stored in the file: the original configs use 128).
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

# Original top-level prefix -> ours (first match wins). Exact names end without a dot.
TOP_LEVEL: tuple[tuple[str, str], ...] = (
    ("meta_queries", "think_tokens"),
    ("projector_1.", "bridge.fuse."),
    ("projector_2.", "bridge.pooled_head."),
    ("projector_3.", "bridge.seq_head."),
    ("connector.layers.", "bridge.layers."),
    ("transformer.", "dit."),
    ("lmm.", "vlm."),
)
IGNORED_PREFIXES = ("vae.", "ema.")
# Wrappers some savers add in front of the model's own names (DDP/DeepSpeed ``module.``, HF Trainer ``model.``).
WRAPPERS = ("module.", "model.")
KNOWN_ROOTS = tuple(p for p, _ in TOP_LEVEL) + IGNORED_PREFIXES + ("connector.",)

# Qwen2.5-VL key drift inside ``lmm.`` (first match wins). transformers >= 4.52 (the original pins 4.56.1,
# we run 5.x) nests ``model.visual`` and ``model.language_model``; older versions (and the RL loader's remap,
# ``_remap_ckpt_keys_for_qwen25vl`` in deepgen_rl/trainer/grpo_deepgen_trainer.py) use ``visual`` and ``model``.
VLM_DRIFT: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model.language_model."),
    ("model.visual.", "model.visual."),
    ("visual.", "model.visual."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)

_LORA = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.(?P<adapter>[^.]+)(?P<tail>\.weight)?$"
)


@dataclass
class ImportReport:
    """What an import did. ``matched``/``missing``/``merged_lora`` use our names; the others the file's names."""

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    merged_lora: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {
            "matched": len(self.matched),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "ignored": len(self.ignored),
            "merged_lora": len(self.merged_lora),
        }

    def missing_by_part(self) -> dict[str, int]:
        parts: dict[str, int] = {}
        for key in self.missing:
            part = key.split(".", 1)[0]
            parts[part] = parts.get(part, 0) + 1
        return parts

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        lines = [f"DeepGen import: {counts}"]
        if self.missing:
            lines.append(f"  missing by part (kept as loaded): {self.missing_by_part()}")
        if self.unexpected:
            shown = ", ".join(self.unexpected[:10])
            more = f" (+{len(self.unexpected) - 10} more)" if len(self.unexpected) > 10 else ""
            lines.append(f"  unexpected: {shown}{more}")
        return "\n".join(lines)


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for wrapper in WRAPPERS:
            rest = key[len(wrapper) :]
            if key.startswith(wrapper) and rest.startswith(KNOWN_ROOTS):
                key, changed = rest, True
    return key


def original_to_ours(key: str) -> str | None:
    """Our name for an original key (before PEFT/base-layer resolution); None when nothing maps to it."""
    key = _strip_wrappers(key)
    for src, dst in TOP_LEVEL:
        if src.endswith("."):
            if key.startswith(src):
                rest = key[len(src) :]
                if src == "lmm.":
                    for old, new in VLM_DRIFT:
                        if rest.startswith(old):
                            return dst + new + rest[len(old) :]
                    return None
                return dst + rest
        elif key == src:
            return dst
    return None


def _resolve_base(name: str, ours: dict[str, Tensor]) -> str | None:
    """Match ``X.weight`` with ``X.base_layer.weight`` either way (peft wraps adapted layers)."""
    if name in ours:
        return name
    if ".base_layer." in name:
        plain = name.replace(".base_layer.", ".")
        return plain if plain in ours else None
    head, _, leaf = name.rpartition(".")
    wrapped = f"{head}.base_layer.{leaf}"
    return wrapped if wrapped in ours else None


def _tied_lm_head(backbone: nn.Module) -> bool:
    vlm = getattr(backbone, "vlm", None)
    if vlm is None or not hasattr(vlm, "lm_head"):
        return False
    head = getattr(vlm.lm_head, "base_layer", vlm.lm_head)
    embed = vlm.get_input_embeddings()
    embed = getattr(embed, "base_layer", embed)
    return head.weight is embed.weight


def import_deepgen_state(
    state: dict[str, Tensor], backbone: nn.Module, *, lora_alpha: float = 128.0
) -> ImportReport:
    """Load a state dict in the original DeepGen naming into ``backbone``; see the module docstring.

    Raises ``ValueError`` (naming the keys) on shape mismatches or when two file keys land on one of ours.
    Nothing is loaded when it raises.
    """
    ours = backbone.state_dict()
    tied = _tied_lm_head(backbone)
    report = ImportReport()
    mapped: dict[str, Tensor] = {}
    source_of: dict[str, str] = {}
    lora: dict[str, dict[str, tuple[str, Tensor]]] = {}  # our module path -> kind -> (source key, tensor)

    def put(our_key: str, src_key: str, tensor: Tensor) -> None:
        if our_key in mapped:
            raise ValueError(f"File keys {source_of[our_key]!r} and {src_key!r} both map to {our_key!r}")
        mapped[our_key], source_of[our_key] = tensor, src_key

    for src_key, tensor in state.items():
        if not isinstance(tensor, Tensor):
            report.unexpected.append(src_key)
            continue
        if _strip_wrappers(src_key).startswith(IGNORED_PREFIXES):
            report.ignored.append(src_key)
            continue
        name = original_to_ours(src_key)
        if name is None:
            report.unexpected.append(src_key)
            continue
        if tied and name.startswith("vlm.lm_head."):
            # DeepGen never uses the LM head; with tied embeddings loading it would overwrite embed_tokens.
            report.ignored.append(src_key)
            continue
        lora_match = _LORA.match(name)
        if lora_match:
            direct = f"{lora_match['module']}.{lora_match['kind']}.default{lora_match['tail'] or ''}"
            if direct in ours:
                put(direct, src_key, tensor)
            else:
                lora.setdefault(lora_match["module"], {})[lora_match["kind"]] = (src_key, tensor)
            continue
        target = _resolve_base(name, ours)
        if target is None:
            report.unexpected.append(src_key)
        else:
            put(target, src_key, tensor)

    merges: dict[str, tuple[list[str], Tensor, bool]] = {}
    for module, parts in lora.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        base = _resolve_base(f"{module}.weight", ours)
        if a_kind not in parts or b_kind not in parts or base is None:
            report.unexpected.extend(src for src, _ in parts.values())
            continue
        (src_a, a), (src_b, b) = parts[a_kind], parts[b_kind]
        delta = b.float() @ a.float()
        merges[base] = ([src_a, src_b], delta.T if embedding else delta, embedding)

    shape_errors = [
        f"{source_of[k]} -> {k}: file {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
        for k, v in mapped.items()
        if v.shape != ours[k].shape
    ]
    shape_errors += [
        f"{' + '.join(srcs)} -> {k}: LoRA delta {tuple(d.shape)} vs model {tuple(ours[k].shape)}"
        for k, (srcs, d, _) in merges.items()
        if d.shape != ours[k].shape
    ]
    if shape_errors:
        raise ValueError("Shape mismatch importing DeepGen weights:\n  " + "\n  ".join(shape_errors))

    for base, (srcs, delta, _) in merges.items():
        rank = state[srcs[0]].shape[0]
        weight = mapped.get(base, ours[base]).float() + (lora_alpha / rank) * delta
        mapped[base] = weight.to(ours[base].dtype)
        source_of.setdefault(base, srcs[0])
        report.merged_lora.append(base)

    result = backbone.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:  # cannot happen: every key was checked against state_dict()
        raise RuntimeError(f"load_state_dict rejected {result.unexpected_keys}")
    report.matched = sorted(mapped)
    # Tied weights (lm_head / embed_tokens) count as loaded through either name.
    loaded = {ours[k].data_ptr() for k in mapped}
    report.missing = [k for k in ours if k not in mapped and ours[k].data_ptr() not in loaded]
    return report


# ------------------------------------------------------------------------------------------ files
DS_MODEL_STATES = "mp_rank_00_model_states.pt"
LAYOUTS = (
    "a .pt/.pth/.bin state dict (optionally under 'state_dict' or 'module'), a .safetensors file, "
    "a DeepSpeed checkpoint folder (iter_N.pth/ with 'latest' and <tag>/mp_rank_00_model_states.pt), "
    "an HF-Trainer folder (model.safetensors), or a diffusers-format folder (transformer/ + connector/model.safetensors)"
)


def _torch_load(path: Path, allow_pickle: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise ValueError(
                f"{path} holds pickled objects that torch.load(weights_only=True) refuses ({err}). If you trust the "
                "file, pass allow_pickle=True, or convert it to a plain state dict first."
            ) from None
        return torch.load(path, map_location="cpu", weights_only=False)


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "module"):  # mmengine/xtuner, DeepSpeed model states
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not contain a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _load_weight_files(files: list[Path], allow_pickle: bool) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for f in sorted(files):
        part = load_file(f) if f.suffix == ".safetensors" else _unwrap(_torch_load(f, allow_pickle), f)
        state.update(part)
    return state


def _read_diffusers_folder(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    transformer = path / "transformer"
    if transformer.is_dir():
        files = list(transformer.glob("*.safetensors")) or list(transformer.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"{transformer} has no diffusers weights (*.safetensors or *.bin)")
        state.update({f"transformer.{k}": v for k, v in _load_weight_files(files, allow_pickle).items()})
    connector = path / "connector" / "model.safetensors"
    if connector.is_file():
        for k, v in load_file(connector).items():
            # Keys are expected in the original naming; bare encoder keys get the ``connector.`` prefix back.
            state[f"connector.{k}" if k.startswith("layers.") else k] = v
    return state


def read_released_state(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Read any released DeepGen checkpoint layout into one state dict in the original naming."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return load_file(path)
        return _unwrap(_torch_load(path, allow_pickle), path)
    if not path.is_dir():
        raise FileNotFoundError(f"No DeepGen checkpoint at {path}: expected {LAYOUTS}")
    if (path / "connector" / "model.safetensors").is_file() or (path / "model_index.json").is_file():
        return _read_diffusers_folder(path, allow_pickle)
    candidates = [path / DS_MODEL_STATES]
    if (path / "latest").is_file():
        candidates.append(path / (path / "latest").read_text().strip() / DS_MODEL_STATES)
    candidates += sorted(path.glob(f"*/{DS_MODEL_STATES}"))
    for candidate in candidates:
        if candidate.is_file():
            # ZeRO-1/2 keep the full module weights (model dtype) here; fp32 masters live in the optimizer files.
            return _unwrap(_torch_load(candidate, allow_pickle), candidate)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return _load_weight_files([path / s for s in shards], allow_pickle)
    files = list(path.glob("*.safetensors")) or list(path.glob("pytorch_model*.bin"))
    if files:
        return _load_weight_files(files, allow_pickle)
    raise FileNotFoundError(f"{path} is not a known DeepGen checkpoint folder: expected {LAYOUTS}")


def load_released(
    path: str | Path, backbone: nn.Module, *, lora_alpha: float = 128.0, allow_pickle: bool = False
) -> ImportReport:
    """Read a released DeepGen-1.0 checkpoint (any layout, see ``LAYOUTS``) and import it into ``backbone``."""
    return import_deepgen_state(
        read_released_state(path, allow_pickle=allow_pickle), backbone, lora_alpha=lora_alpha
    )
