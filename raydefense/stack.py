"""AFS stacking: frozen extractors, concatenated features, one learned linear merger.

The merger is trained with alpha * CE(clean) + (1 - alpha) * CE(adversarial), where the
adversarial examples are crafted by PGD through the WHOLE stack at the merger budget (paper Eq. 5).
The stack is saved as a self-contained checkpoint (kind ``afs-stack``: every extractor's weights
and config inside), so ``load_model`` and ``raydefense evaluate`` treat it like any other model.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import pgd_ce
from raydefense.checkpoint import method_from_weights, read_config, safe_torch_load, save_checkpoint
from raydefense.data import DatasetInfo, Splits
from raydefense.errors import CheckpointError, UserError
from raydefense.provenance import provenance
from raydefense.train import accuracy, lr_multiplier, robust_accuracy, seed_everything

log = logging.getLogger(__name__)


class AFSStack(nn.Module):
    """Images in [0,1] -> each frozen extractor's features -> concatenation -> linear merger."""

    def __init__(self, extractors: list[nn.Module], num_classes: int):
        super().__init__()
        self.extractors = nn.ModuleList(extractors)
        for p in self.extractors.parameters():
            p.requires_grad_(False)
        self.block_dims = [self._feature_dim(e) for e in extractors]
        self.merger = nn.Linear(sum(self.block_dims), num_classes)
        self.init_as_logit_average()

    def init_as_logit_average(self) -> bool:
        """Start the merger as the average of the extractors' own linear heads.

        The stack then begins as the logit-averaging ensemble of its extractors, a working model,
        instead of a random linear layer; merger training moves on from there (on digits it reaches
        its best validation trade-off in fewer epochs). Returns False, keeping PyTorch's default
        initialization, when an extractor has no linear head over its features.
        """
        heads = [getattr(e, "head", None) for e in self.extractors]
        if not all(isinstance(h, nn.Linear) and h.in_features == d and h.out_features == self.merger.out_features
                   for h, d in zip(heads, self.block_dims)):
            return False
        with torch.no_grad():
            self.merger.weight.copy_(torch.cat([h.weight for h in heads], dim=1) / len(heads))
            self.merger.bias.copy_(torch.stack([h.bias for h in heads]).mean(0))
        return True

    @staticmethod
    def _feature_dim(extractor: nn.Module) -> int:
        return int(extractor.backbone.out_dim)

    def train(self, mode: bool = True) -> "AFSStack":
        super().train(mode)
        self.extractors.eval()  # frozen: BatchNorm statistics never move
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([e.features(x) for e in self.extractors], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merger(self.features(x))

    def importance(self) -> list[float]:
        """Each extractor's share of sum |W| of the merger (paper Fig. 5b)."""
        w = self.merger.weight.detach().abs()
        blocks = torch.split(w, self.block_dims, dim=1)
        total = float(w.sum()) or 1.0
        return [float(b.sum()) / total for b in blocks]


@dataclass
class MergerConfig:
    alpha: float = 0.5  # weight of the clean loss
    eps: float | None = None  # merger budget; None: the dataset's standard eps
    epochs: int = 15
    lr: float = 0.1
    batch_size: int = 128
    attack_steps: int = 10
    seed: int = 0


def load_extractor(ckpt_dir: Path, device: torch.device) -> tuple[nn.Module, dict]:
    config = read_config(ckpt_dir)
    if config["kind"] != "method":
        raise CheckpointError(f"{ckpt_dir} is not a trained extractor (kind {config['kind']!r})")
    weights = safe_torch_load(Path(ckpt_dir) / "model.pt", map_location=device)
    model = method_from_weights(Path(ckpt_dir), config, weights, device).inference_module()
    if not hasattr(model, "features") or not hasattr(getattr(model, "backbone", None), "out_dim"):
        raise CheckpointError(f"{ckpt_dir}: its model exposes no features() to stack")
    return model.eval(), config


def train_merger(stack: AFSStack, splits: Splits, cfg: MergerConfig,
                 on_epoch: Callable[[int, dict], None] | None = None) -> dict[str, float]:
    """Train only the merger; keep the epoch with the best validation trade-off (mean of clean and PGD-10)."""
    if not 0 <= cfg.alpha <= 1:
        raise UserError(f"alpha must be in [0, 1], got {cfg.alpha}")
    seed_everything(cfg.seed)
    eps = splits.info.standard_eps if cfg.eps is None else cfg.eps
    x, y = splits.train.tensors()
    vx, vy = splits.val.tensors()
    n_batches = math.ceil(len(y) / cfg.batch_size)
    opt = torch.optim.SGD(stack.merger.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier("piecewise", cfg.epochs * n_batches))
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state = {"val_tradeoff": -1.0}, None
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        stack.train()
        for b in range(n_batches):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb, yb = x[idx], y[idx]
            loss = cfg.alpha * F.cross_entropy(stack(xb), yb) if cfg.alpha > 0 else 0.0
            if cfg.alpha < 1:
                xa = pgd_ce(stack, xb, yb, eps, cfg.attack_steps, eps / 4, generator=gen)  # the whole stack
                loss = loss + (1 - cfg.alpha) * F.cross_entropy(stack(xa), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        stack.eval()
        clean = accuracy(stack, vx, vy)
        robust = robust_accuracy(stack, vx, vy, eps, 10, generator=gen)
        metrics = {"epoch": epoch + 1, "val_clean_acc": clean, "val_pgd10_acc": robust, "val_tradeoff": (clean + robust) / 2}
        if metrics["val_tradeoff"] > best["val_tradeoff"]:
            best, best_state = metrics, copy.deepcopy(stack.merger.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    stack.merger.load_state_dict(best_state)
    return best


def stack_config(info: DatasetInfo, extractor_configs: list[dict], budgets: list[float], cfg: MergerConfig,
                 best: dict, data_dir: str | None) -> dict:
    return {"kind": "afs-stack", "dataset": info.to_dict(), "data_dir": data_dir,
            "extractors": [{"budget": b, "train": c["train"], "dataset": c["dataset"]}
                           for b, c in zip(budgets, extractor_configs)],
            "merger": {**cfg.__dict__, "eps": info.standard_eps if cfg.eps is None else cfg.eps},
            "best": best, "finished": True, "provenance": provenance()}


def save_stack(out: Path, stack: AFSStack, config: dict) -> Path:
    return save_checkpoint(out, config, {"stack": {k: v.detach().clone() for k, v in stack.state_dict().items()}})


def load_stack_model(ckpt_dir: Path, config: dict, weights: dict, device: torch.device) -> nn.Module:
    """MODEL_LOADERS entry for kind 'afs-stack': rebuild each extractor from its stored config."""
    from raydefense.config import TrainConfig
    from raydefense.methods import MethodContext, build_method

    try:
        info = DatasetInfo.from_dict(config["dataset"])
        extractors = [build_method(MethodContext(TrainConfig.from_dict(e["train"]), DatasetInfo.from_dict(e["dataset"]),
                                                 device)).inference_module() for e in config["extractors"]]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"corrupt {ckpt_dir / 'config.json'}: missing or malformed field {exc}") from None
    stack = AFSStack(extractors, info.num_classes).to(device)
    try:
        stack.load_state_dict(weights["stack"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt_dir}: stack weights do not fit: {str(exc).splitlines()[0]}") from None
    return stack
