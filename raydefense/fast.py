"""Opt-in fast paths for training: channels_last, bf16 autocast and ``torch.compile``.

``fit`` applies them from ``TrainConfig`` (``channels_last``, ``amp``, ``compile``). They change
how the same computation runs, never what is computed: modules keep their parameter names (so
checkpoints and ``load_method`` are unaffected; ``nn.Module.compile`` compiles in place instead of
wrapping), validation and evaluation always run in fp32, and only the training step (the
training attack plus the weight update) runs under autocast. The defaults are all off: on the
2-core CPU the measurements in docs/performance.md show which of these pay for which model.
"""

from __future__ import annotations

import contextlib
import logging
from typing import ContextManager, Iterable

import torch
from torch import nn

from raydefense.config import TrainConfig
from raydefense.errors import UserError

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def validate_fast_paths(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse combinations that would silently train something else (fp16 without a GPU)."""
    if cfg.amp not in ("off", *AMP_DTYPES):
        raise UserError(f"amp must be off, bf16 or fp16, got {cfg.amp!r}")
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UserError("amp=fp16 needs a CUDA device (it needs loss scaling); on CPU use amp=bf16 or off")
    if cfg.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("amp=bf16: this GPU has no bf16 support; use amp=fp16 or off")
    if cfg.amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("amp=bf16: this CPU has no native bf16 (no AVX-512 BF16 / AMX); oneDNN emulates it, "
                    "measured 8x slower than fp32 on an AVX2 CPU (docs/performance.md); amp=off is faster here")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 family or AMX); else it is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def prepare_modules(modules: Iterable[nn.Module], cfg: TrainConfig) -> None:
    """Apply channels_last and torch.compile to the method's modules, in place."""
    for module in modules:
        if cfg.channels_last:
            module.to(memory_format=torch.channels_last)
        if cfg.compile:
            module.compile()  # in place: state_dict keys stay the same (no "_orig_mod." prefix)


def to_memory_format(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Inputs in channels_last when the modules are (4-D image batches only)."""
    if cfg.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(cfg: TrainConfig, device: torch.device) -> ContextManager:
    """The mixed-precision context of one training step (a no-op with amp=off)."""
    if cfg.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[cfg.amp])


class GradScalerStep:
    """fp16 on CUDA needs loss scaling; bf16 and fp32 do not (their exponent range is fp32's)."""

    def __init__(self, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type)

    def __call__(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
