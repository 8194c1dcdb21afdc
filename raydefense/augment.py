"""Seeded on-device augmentation: random crop with padding and horizontal flips.

Every CIFAR adversarial-training baseline (Madry, TRADES, Rice et al. 2020, the AFS code) trains on
random 32x32 crops of the 4-pixel-padded image and random horizontal flips. Here the random choices
are drawn per sample and per epoch from a CPU generator seeded by (seed, epoch), so the batches are
the same on every device, on every data-parallel worker (they index the same per-sample draws) and
after a resume (runs resume at epoch boundaries). The crop and flip are one gather on the training
device, for uint8 and float images alike.

``auto`` picks per dataset: crop and flip on natural images, crop only on SVHN, nothing on digits
and the MNIST-likes (their standard recipes do not augment). Flipping a digit changes what it is,
so a flip on digits, MNIST or SVHN is refused even when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raydefense.errors import UserError

OPS = ("crop", "flip")
# The augmentation ``auto`` gives each dataset; a dataset not listed gets none.
AUTO: dict[str, tuple[str, ...]] = {
    "cifar10": ("crop", "flip"),
    "cifar100": ("crop", "flip"),
    "svhn": ("crop",),
    "tiny-imagenet": ("crop", "flip"),
    "imagenette": ("crop", "flip"),
}
NO_FLIP = frozenset({"digits", "mnist", "svhn"})  # mirrored digits are other symbols
_STREAM = 0xA06  # keeps augmentation draws apart from the batch order's generator


def parse_ops(spec: str, dataset: str) -> tuple[str, ...]:
    """``auto``, ``none`` or a comma list of crop/flip -> the operations to apply on ``dataset``."""
    text = str(spec).strip().lower()
    if text == "auto":
        return AUTO.get(dataset, ())
    if text in ("none", "off", ""):
        return ()
    ops = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in ops if p not in OPS]
    if unknown:
        raise UserError(f"augment: unknown operation {unknown[0]!r}; use auto, none or a comma list of crop, flip")
    if "flip" in ops and dataset in NO_FLIP:
        raise UserError(f"augment: {dataset} must not be flipped (a mirrored digit is another symbol); use --augment crop")
    return ops


@dataclass(frozen=True)
class Augmenter:
    """Crop (with ``padding`` pixels, zero or reflect padded) and/or flip for images of ``height`` x ``width``."""

    ops: tuple[str, ...]
    padding: int
    pad_mode: str
    height: int
    width: int

    def for_epoch(self, seed: int, epoch: int, n: int, device: torch.device) -> "EpochAugment":
        """Per-sample draws for one epoch of ``n`` training samples (deterministic in seed and epoch)."""
        state = np.random.SeedSequence([int(seed) % 2**63, int(epoch), _STREAM]).generate_state(2)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        span = 2 * self.padding + 1 if "crop" in self.ops else 1
        offsets = torch.randint(0, span, (n, 2), generator=gen)  # top, left in the padded image
        flips = torch.rand(n, generator=gen) < 0.5 if "flip" in self.ops else torch.zeros(n, dtype=torch.bool)
        pad = self.padding if "crop" in self.ops else 0
        return EpochAugment(self, offsets.to(device) - pad, flips.to(device))


@dataclass(frozen=True)
class EpochAugment:
    augmenter: Augmenter
    offsets: torch.Tensor  # (N, 2) shift of each sample's crop relative to the unpadded image
    flips: torch.Tensor  # (N,) bool

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The augmented batch ``x`` (N, C, H, W) of the training samples ``idx`` (same shape and dtype)."""
        a = self.augmenter
        off, flip = self.offsets[idx], self.flips[idx]
        ar_h = torch.arange(a.height, device=x.device)
        ar_w = torch.arange(a.width, device=x.device)
        cols = torch.where(flip[:, None], a.width - 1 - ar_w, ar_w)
        rows = off[:, :1] + ar_h  # (B, H) source rows, may fall into the padding
        cols = off[:, 1:] + cols  # (B, W)
        b, c = x.shape[:2]
        if a.pad_mode == "reflect":  # map the padding back into the image: no padded copy
            rows, cols, width = _reflect(rows, a.height), _reflect(cols, a.width), a.width
        else:  # zeros: gather from a zero-padded copy
            pad = a.padding
            x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
            rows, cols, width = rows + pad, cols + pad, a.width + 2 * pad
        flat = (rows[:, :, None] * width + cols[:, None, :]).reshape(b, 1, -1).expand(b, c, -1)
        return x.reshape(b, c, -1).gather(2, flat).reshape(b, c, a.height, a.width)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """numpy/torch 'reflect' padding index (edge not repeated), for padding < size."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def build_augmenter(spec: str, padding: int | None, pad_mode: str, dataset: str,
                    shape: tuple[int, int, int]) -> Augmenter | None:
    """The augmenter a run asked for on ``dataset``, or None when it augments nothing."""
    ops = parse_ops(spec, dataset)
    _, height, width = shape
    pad = max(1, height // 8) if padding is None else int(padding)  # 4 px on 32x32, as every CIFAR recipe
    if pad < 0 or pad >= min(height, width):
        raise UserError(f"augment_padding must be in 0..{min(height, width) - 1} for {height}x{width} images, got {pad}")
    if pad_mode not in ("zeros", "reflect"):
        raise UserError(f"augment_pad_mode must be zeros or reflect, got {pad_mode!r}")
    if not ops or (ops == ("crop",) and pad == 0):
        return None
    return Augmenter(ops, pad, pad_mode, height, width)


__all__ = ["AUTO", "NO_FLIP", "Augmenter", "EpochAugment", "build_augmenter", "parse_ops"]
