"""One checkpoint format: a directory with safetensors weights and a ``weights_only``-safe state file.

``weights.safetensors`` holds the model tensors (a stage saves only its trainable weights);
``state.pt`` holds everything else (optimiser, scheduler, loop counters, the run config as text)
and is loaded with ``torch.load(weights_only=True)``, so loading never executes pickled code.
Writes go to a temporary sibling and are renamed into place: a crash never leaves a partial
checkpoint under the final name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

WEIGHTS, STATE = "weights.safetensors", "state.pt"


def save_checkpoint_dir(checkpoint: dict, path: str | Path) -> None:
    """Write ``checkpoint`` (with a ``state_dict`` of tensors) to the directory ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rest = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    weights = {k: v.detach().contiguous().cpu() for k, v in checkpoint.get("state_dict", {}).items()}
    try:
        save_file(weights, tmp / WEIGHTS)
        torch.save(rest, tmp / STATE)
        torch.load(tmp / STATE, weights_only=True)  # refuse to write what could not be loaded safely
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def load_checkpoint_dir(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint directory written by :func:`save_checkpoint_dir`, without unpickling code."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / STATE).is_file():
        raise FileNotFoundError(
            f"{path} is not a deepgen checkpoint: expected {WEIGHTS} and {STATE} inside it"
        )
    checkpoint = torch.load(path / STATE, map_location=map_location, weights_only=True)
    checkpoint["state_dict"] = load_file(path / WEIGHTS, device=str(map_location))
    return checkpoint


def copy_weights(weights: dict[str, Tensor], params: dict[str, Tensor], what: str, hint: str) -> None:
    """Copy ``weights`` into the model's ``params`` by name, all or nothing.

    Refuses, naming a weight, when the checkpoint (``what``, e.g. "init_from=...") holds a weight the
    model lacks or one of another shape; ``hint`` says which settings to check.
    """
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(
            f"{what} does not match this model: {len(unknown)} weights it does not have "
            f"(e.g. {unknown[:3]}); {hint}"
        )
    wrong = [k for k, v in weights.items() if v.shape != params[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{what} does not match this model: {k} has shape {tuple(weights[k].shape)}, the model "
            f"{tuple(params[k].shape)} ({len(wrong)} such weights); {hint}"
        )
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
