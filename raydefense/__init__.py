"""raydefense: train, search, stack and honestly evaluate adversarially robust models on Ray."""

from __future__ import annotations

__version__ = "0.1.0"


def load_model(checkpoint_dir, device="cpu"):
    """The inference module of a checkpoint in eval mode: images in [0,1] NCHW -> logits."""
    from raydefense.checkpoint import load_model as _load

    return _load(checkpoint_dir, device)


def load_dataset(name="digits", split="test", data_dir=None, download=False):
    """``(images float tensor in [0,1], labels long tensor)`` for one split of a named dataset."""
    from raydefense.data import load_dataset as _load

    return _load(name, split, data_dir, download)


__all__ = ["__version__", "load_dataset", "load_model"]
