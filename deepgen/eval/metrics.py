"""FID and CLIP score through torchmetrics, from local weights only (nothing is downloaded).

torchmetrics' own FID extractor needs torch-fidelity (and so torchvision), which cannot be installed beside
the CPU torch, and its CLIPScore only accepts hub names or a loader callable. So:

- **FID** (``FrechetInceptionDistance(feature=<module>)``) takes one of two local extractors
  (``load_fid_features``):
  1. a TorchScript file (``torch.jit.save``) mapping float images ``[N, 3, 299, 299]`` with values in
     0-255 to features ``[N, D]``. NVlabs' ``inception-2015-12-05.pt`` (the TF FID Inception that
     StyleGAN2-ADA and clean-fid use) is recognised by its ``return_features`` argument and gives its
     2048-d pool features. Resizing differs a little from each of those tools, so compare FIDs only
     within this one (same weights, same reference set);
  2. a local CLIP directory (``CLIPModel.save_pretrained`` layout): FID in CLIP image-embedding space,
     comparable only with FIDs computed in the same space.
  Plain state dicts are not accepted: they would need the network's code (torchvision's or
  pytorch-fid's Inception), which the project cannot install.
  Every image is first resized to 299 x 299 (PIL bicubic), whatever the extractor.
- **CLIP score** (``CLIPScore``, 100 x the cosine of image and text embeddings, averaged) loads a local
  CLIP directory through the loader callable, with text truncated to CLIP's 77 positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from deepgen.rewards.clip import CLIP_MAX_TOKENS

FID_SIZE = 299
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FID_WEIGHTS = (
    "a TorchScript feature extractor file (e.g. NVlabs' inception-2015-12-05.pt) or a local CLIP "
    "directory saved with save_pretrained (config.json, weights, tokenizer files, preprocessor_config.json)"
)
T = TypeVar("T")


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _embeds(output: Tensor | Any) -> Tensor:
    # transformers 5.x returns a model output whose pooler_output holds the projected embeddings.
    return output if isinstance(output, Tensor) else output.pooler_output


def _clip_model_class() -> type:
    from transformers import CLIPModel

    class ClipWithTensorFeatures(CLIPModel):
        """torchmetrics normalises what ``get_*_features`` return, so they must be tensors (5.x returns outputs)."""

        def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
            return _embeds(super().get_image_features(*args, **kwargs))

        def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
            return _embeds(super().get_text_features(*args, **kwargs))

    return ClipWithTensorFeatures


def check_clip_dir(path: str | Path) -> Path:
    """``path`` if it looks like a saved CLIP (a cheap check, so a long run can fail before it starts)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"CLIP directory {path} has no config.json: expected a CLIPModel saved with save_pretrained "
            "(config.json, weights, tokenizer files, preprocessor_config.json)"
        )
    return path


def check_fid_weights(path: str | Path) -> Path:
    """``path`` if it can be FID weights: an existing file, or a CLIP directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"FID weights {path} do not exist: expected {FID_WEIGHTS}")
    return check_clip_dir(path) if path.is_dir() else path


def load_clip(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Any, Any]:
    """(model, tokenizer, PIL image processor) of a local CLIP directory, in eval mode.

    The PIL image processor, because the default "fast" one needs torchvision.
    """
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    path = check_clip_dir(path)
    model = _clip_model_class().from_pretrained(path).to(device).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path), CLIPImageProcessorPil.from_pretrained(path)


class ClipProcessor:
    """The processor call torchmetrics' CLIPScore makes, with text truncated by the tokenizer: torchmetrics
    would cut the ids itself and drop the end-of-text token whose embedding CLIP uses."""

    def __init__(self, tokenizer: Any, image_processor: Any, max_tokens: int) -> None:
        self.tokenizer, self.image_processor, self.max_tokens = tokenizer, image_processor, max_tokens

    def __call__(
        self, text: list[str] | None = None, images: list[Tensor] | None = None, **kwargs: Any
    ) -> Any:
        if text is not None:
            return self.tokenizer(
                text, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
            )
        return self.image_processor(images=images, return_tensors="pt")


class ClipImageFeatures(nn.Module):
    """uint8 images ``[N, 3, H, W]`` -> projected CLIP image embeddings ``[N, D]``: FID in CLIP space."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        super().__init__()
        self.model, _, self.image_processor = load_clip(path, device)
        self.num_features = int(self.model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        arrays = list(images.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy())
        pixels = self.image_processor(images=arrays, return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixels.to(self.model.device, self.model.dtype))
        return features.float().cpu()  # torchmetrics keeps the FID sums on the CPU


class TorchScriptFeatures(nn.Module):
    """A TorchScript extractor: float ``[N, 3, H, W]`` in 0-255 -> ``[N, D]``. NVlabs' Inception returns
    logits by default, its pool features with ``return_features=True``."""

    def __init__(self, model: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.model = model
        self.return_features = "return_features" in str(model.forward.schema)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        params = list(self.model.parameters())
        x = images.to(params[0].device if params else "cpu", torch.float32)
        out = self.model(x, return_features=True) if self.return_features else self.model(x)
        return out.reshape(out.shape[0], -1).float().cpu()  # torchmetrics keeps the FID sums on the CPU


def load_fid_features(path: str | Path, device: str = "cpu") -> nn.Module:
    """The FID feature extractor at ``path``: a TorchScript file or a local CLIP directory."""
    path = check_fid_weights(path)
    if path.is_dir():
        return ClipImageFeatures(path, device)
    try:
        model = torch.jit.load(str(path), map_location=device)
    except RuntimeError:
        raise ValueError(f"FID weights {path} are not a TorchScript file: expected {FID_WEIGHTS}") from None
    return TorchScriptFeatures(model.eval())


def image_files(folder: str | Path) -> list[Path]:
    """Every image under ``folder`` (recursively), sorted; an error if there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"Image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_images(files: Iterable[Path]) -> Iterator[np.ndarray]:
    """``[H, W, 3]`` uint8 arrays, one file at a time."""
    for path in files:
        with Image.open(path) as img:
            yield np.asarray(img.convert("RGB"))


def _fid_input(image: np.ndarray) -> np.ndarray:
    if image.shape[:2] == (FID_SIZE, FID_SIZE):
        return image
    return np.asarray(Image.fromarray(image).resize((FID_SIZE, FID_SIZE), Image.Resampling.BICUBIC))


def frechet_distance(
    generated: Iterable[np.ndarray],
    reference: Iterable[np.ndarray],
    feature: nn.Module,
    batch_size: int = 32,
) -> float:
    """FID between two sets of ``[H, W, 3]`` uint8 images, with ``feature`` (see ``load_fid_features``)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature, input_img_size=(3, FID_SIZE, FID_SIZE))
    counts = {}
    for real, images in ((False, generated), (True, reference)):
        counts[real] = 0
        for batch in _chunks(images, batch_size):
            pixels = torch.from_numpy(np.stack([_fid_input(img) for img in batch])).permute(0, 3, 1, 2)
            metric.update(pixels, real=real)
            counts[real] += len(batch)
    if min(counts.values()) < 2:
        raise ValueError(
            f"FID needs at least 2 images in each set, got {counts[False]} generated, {counts[True]} reference"
        )
    return float(metric.compute())


def clip_score(
    pairs: Iterable[tuple[np.ndarray, str]],
    weights: str | Path,
    batch_size: int = 32,
    device: str = "cpu",
) -> float:
    """torchmetrics' CLIP score (100 x mean cosine, floored at 0) of (``[H, W, 3]`` uint8 image, prompt) pairs."""
    from torchmetrics.multimodal import CLIPScore

    model, tokenizer, image_processor = load_clip(weights, device)
    max_tokens = min(CLIP_MAX_TOKENS, model.config.text_config.max_position_embeddings)
    processor = ClipProcessor(tokenizer, image_processor, max_tokens)
    loader: Callable[[], tuple[Any, Any]] = lambda: (model, processor)  # noqa: E731
    metric = CLIPScore(model_name_or_path=loader).to(device)
    n = 0
    for batch in _chunks(pairs, batch_size):
        images = [torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).to(device) for img, _ in batch]
        with torch.no_grad():
            metric.update(images, [prompt for _, prompt in batch])
        n += len(batch)
    if n == 0:
        raise ValueError("CLIP score needs at least one image")
    return float(metric.compute())
