"""RFD routing: inputs the RFD detector judges clean go to a naturally trained model, the rest to
RFD's robust classifier C(E_r(G(x))) (Wang et al., Sec. IV-E).

``build_route`` writes a self-contained checkpoint of kind ``route``: config.json embeds both
source configs (and their paths, for the record), model.pt holds both weight sets, so the routed
model loads and is attacked like any other checkpoint (``raydefense evaluate``). The routing is a
hard decision; ``SoftRouted`` is the differentiable surrogate adaptive attacks take gradients from.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.checkpoint import (WEIGHTS, method_from_weights, load_method_model, read_config, safe_torch_load,
                                   save_checkpoint)
from raydefense.errors import CheckpointError, UserError
from raydefense.provenance import provenance

KIND = "route"


class RoutedModel(nn.Module):
    """x -> robust(x) where detector(x) > threshold (judged adversarial), else natural(x)."""

    def __init__(self, detector: nn.Module, robust: nn.Module, natural: nn.Module, threshold: float = 0.0):
        super().__init__()
        self.detector, self.robust, self.natural = detector, robust, natural
        self.threshold = float(threshold)

    def flags(self, x: torch.Tensor) -> torch.Tensor:
        """True where the input is judged adversarial (and so goes to the robust classifier)."""
        return self.detector(x) > self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adv = self.flags(x)
        return torch.where(adv[:, None], self.robust(x), self.natural(x))


class SoftRouted(nn.Module):
    """Differentiable surrogate of a ``RoutedModel``: with p = sigmoid((s - threshold) / T), the
    log of the mixture p * softmax(robust) + (1 - p) * softmax(natural). As T -> 0 it is the hard
    router's output distribution; its gradient also flows through the detector."""

    def __init__(self, routed: RoutedModel, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise UserError(f"soft routing temperature must be > 0, got {temperature}")
        self.routed, self.temperature = routed, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routed
        logit = (r.detector(x) - r.threshold) / self.temperature
        mix = torch.stack([F.logsigmoid(logit)[:, None] + F.log_softmax(r.robust(x), 1),
                           F.logsigmoid(-logit)[:, None] + F.log_softmax(r.natural(x), 1)])
        return torch.logsumexp(mix, 0)


def build_route(rfd_dir: str | Path, natural_dir: str | Path, out: str | Path, threshold: float = 0.0) -> Path:
    """Write a self-contained route checkpoint from an rfd checkpoint and a natural one."""
    rfd_dir, natural_dir = Path(rfd_dir), Path(natural_dir)
    rfd_cfg, nat_cfg = read_config(rfd_dir), read_config(natural_dir)
    if rfd_cfg["kind"] != "method" or rfd_cfg.get("train", {}).get("method") != "rfd":
        raise UserError(f"{rfd_dir} is not an rfd checkpoint (train it with `raydefense train rfd`)")
    if nat_cfg["kind"] != "method":
        raise UserError(f"{natural_dir} holds a {nat_cfg['kind']!r}; the natural model must be a trained method")
    names = (rfd_cfg.get("dataset", {}).get("name"), nat_cfg.get("dataset", {}).get("name"))
    if names[0] != names[1]:
        raise UserError(f"the rfd model was trained on {names[0]!r} but the natural model on {names[1]!r}")
    weights = {"rfd": safe_torch_load(rfd_dir / WEIGHTS), "natural": safe_torch_load(natural_dir / WEIGHTS)}
    config = {"kind": KIND, "dataset": rfd_cfg["dataset"], "data_dir": rfd_cfg.get("train", {}).get("data_dir"),
              "threshold": float(threshold), "rfd": rfd_cfg, "natural": nat_cfg,
              "sources": {"rfd": str(rfd_dir.resolve()), "natural": str(natural_dir.resolve())},
              "eps": rfd_cfg.get("eps"), "provenance": provenance()}
    load_route_model(Path(out), config, weights, torch.device("cpu"))  # refuse a checkpoint that cannot load
    return save_checkpoint(out, config, weights)


def load_route_model(ckpt_dir: Path, config: dict, weights: dict, device: torch.device) -> RoutedModel:
    """MODEL_LOADERS entry for kind ``route``."""
    try:
        rfd = method_from_weights(ckpt_dir, config["rfd"], weights["rfd"], device)
        natural = load_method_model(ckpt_dir, config["natural"], weights["natural"], device)
        threshold = float(config.get("threshold", 0.0))
    except KeyError as exc:
        raise CheckpointError(f"{ckpt_dir}: route checkpoint lacks {exc}") from None
    if not hasattr(rfd, "detector"):
        raise CheckpointError(f"{ckpt_dir}: the routed method {config['rfd']['train'].get('method')!r} has no detector")
    return RoutedModel(rfd.detector(), rfd.inference_module(), natural, threshold).to(device).eval()


__all__ = ["KIND", "RoutedModel", "SoftRouted", "build_route", "load_route_model"]
