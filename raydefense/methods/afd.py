"""AFD: adversarial feature desensitization (Bashivan et al., NeurIPS 2021).

The classifier is split into a feature extractor F (normalization, backbone, L2-normalized
penultimate features) and a linear classifier C. A class-conditional domain discriminator D tells
clean features F(x) from adversarial features F(x') of the same class. Each batch makes three
updates, in the paper's order (Algorithm 1), each with its own optimizer and learning rate:

1. (F, C) descend L_C = CE(C(F(x)), y) on clean data            (lr alpha)
2. D descends L_D (DCGAN: softplus(-D(z)) + softplus(D(z')); WGAN: D(z') - D(z)) (lr beta)
3. F descends L_F (DCGAN: softplus(-D(z')); WGAN: -D(z')): adversarial features are pushed
   towards what D calls clean                                     (lr gamma)

The discriminator's accuracy on validation features estimates the H-divergence between clean and
adversarial feature distributions (paper Eq. 6, Fig. 3): ``epoch_diagnostics`` reports it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from raydefense.attacks import eval_mode, pgd_ce
from raydefense.methods.base import Method
from raydefense.models import Classifier, build_backbone

log = logging.getLogger(__name__)


@dataclass
class AFDOptions:
    alpha: float = 0.1  # lr of update 1: (F, C) on clean cross-entropy
    beta: float = 0.1  # lr of update 2: the discriminator
    gamma: float = 0.5  # lr of update 3: F against the discriminator
    disc_width: int = 64  # hidden units of every discriminator layer (paper: 64 MNIST, 512 others)
    form: Literal["dcgan", "wgan"] = "dcgan"
    gp_weight: float = 0.0  # WGAN gradient penalty on interpolated features (0: none, the paper's form)
    attack: Literal["pgd", "apgd-ce"] = "pgd"  # training attack (paper: adaptive PGD)
    update_features: bool = True  # False disables update 3 (an ablation: CE on clean data + a passive D)
    # F(x) = feature_scale * unit-norm features (None: sqrt(feature dim), unit RMS per dimension).
    # With scale 1 the logits start near 0, L_C's gradient is too weak against L_F, and the
    # 1-Lipschitz (spectral-norm) D can only output differences of the size of the features.
    feature_scale: Optional[float] = None


@dataclass
class AFDWganOptions(AFDOptions):
    form: Literal["dcgan", "wgan"] = "wgan"


class NormalizedBackbone(nn.Module):
    """A backbone whose output is L2-normalized to a fixed norm ``scale`` (the ref. code's activation
    normalization before C and D); keeps the backbone's ``blocks`` and ``out_dim``."""

    def __init__(self, backbone: nn.Module, scale: float = 1.0):
        super().__init__()
        self.blocks = backbone.blocks
        self.out_dim = backbone.out_dim
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(self.blocks(x), dim=1)


class ProjectionDiscriminator(nn.Module):
    """D(z, y) = w . h + <embed(y), h>, h = MLP(z) (Miyato & Koyama's projection discriminator).

    Three spectral-norm linear layers with LeakyReLU(0.2): two hidden layers give h, the third maps
    h to the unconditional score; the class embedding (spectral-norm too) adds the projection term.
    """

    def __init__(self, in_dim: int, num_classes: int, width: int = 64):
        super().__init__()
        self.layers = nn.ModuleList([spectral_norm(nn.Linear(in_dim, width)),
                                     spectral_norm(nn.Linear(width, width)),
                                     spectral_norm(nn.Linear(width, 1))])
        self.embed = spectral_norm(nn.Embedding(num_classes, width))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.layers[0](z), 0.2)
        h = F.leaky_relu(self.layers[1](h), 0.2)
        return self.layers[2](h).squeeze(1) + (self.embed(y) * h).sum(1)


def disc_loss(d_clean: torch.Tensor, d_adv: torch.Tensor, form: str) -> torch.Tensor:
    """L_D (paper Eq. 9 and 11): clean features are the 'real' domain."""
    if form == "dcgan":
        return F.softplus(-d_clean).mean() + F.softplus(d_adv).mean()
    return d_adv.mean() - d_clean.mean()


def feature_loss(d_adv: torch.Tensor, form: str) -> torch.Tensor:
    """L_F (paper Eq. 10 and 12): F makes adversarial features look clean to D."""
    return F.softplus(-d_adv).mean() if form == "dcgan" else -d_adv.mean()


def gradient_penalty(disc: nn.Module, z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP: (||grad_z D(z_hat, y)|| - 1)^2 on random interpolations of clean and adversarial features."""
    t = torch.rand(len(z), 1, generator=generator, device=z.device, dtype=z.dtype)
    z_hat = (t * z + (1 - t) * z_adv).requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(z_hat, y).sum(), z_hat, create_graph=True)
    return ((grad.norm(dim=1) - 1) ** 2).mean()


def discriminator_accuracy(d_clean: torch.Tensor, d_adv: torch.Tensor, form: str) -> float:
    """Balanced accuracy of D as a clean-vs-adversarial classifier.

    DCGAN scores are logits, so the threshold is 0. A WGAN critic has no calibrated zero (only the
    difference of its means is trained), so its threshold is the midpoint of the two mean scores.
    """
    threshold = 0.0 if form == "dcgan" else float(0.5 * (d_clean.mean() + d_adv.mean()))
    return 0.5 * (float((d_clean > threshold).float().mean()) + float((d_adv <= threshold).float().mean()))


def apgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Reference APGD-CE (pyautoattack) in eval mode. It reseeds torch's global RNG, so it runs
    inside ``fork_rng``; its seed is drawn from ``generator`` so restarts differ between batches."""
    from pyautoattack.autopgd_base import APGDAttack

    if eps <= 0 or steps <= 0:
        return x.detach().clone()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item()) \
        if generator is not None else 0
    devices = [x.device] if x.device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        attack = APGDAttack(model, n_iter=steps, norm="Linf", eps=eps, seed=seed, loss="ce", device=x.device)
        x_adv = attack.perturb(x.detach(), y)
    return x_adv.detach()


class AFD(Method):
    """Adversarial feature desensitization, DCGAN form (``afd-dcgan``)."""

    name = "afd-dcgan"
    Options = AFDOptions

    # -- modules -------------------------------------------------------------------------------
    def build(self) -> None:
        info = self.ctx.info
        raw = build_backbone(self.ctx.arch, info)
        self.feature_scale = self.opts.feature_scale if self.opts.feature_scale is not None else raw.out_dim ** 0.5
        backbone = NormalizedBackbone(raw, self.feature_scale)
        self.model = Classifier(backbone, nn.Linear(backbone.out_dim, info.num_classes), info)
        self.disc = ProjectionDiscriminator(backbone.out_dim, info.num_classes, self.opts.disc_width)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "disc": self.disc}

    def inference_module(self) -> nn.Module:
        return self.model

    def feature_params(self) -> list[nn.Parameter]:
        """F: everything before the linear classifier (Normalize has buffers only)."""
        return [p for n, p in self.model.named_parameters() if not n.startswith("head.")]

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        o = self.opts
        opts = {"classifier": self.make_optimizer(self.model.parameters(), lr=o.alpha),
                "disc": self.make_optimizer(self.disc.parameters(), lr=o.beta)}
        if o.update_features:
            opts["features"] = self.make_optimizer(self.feature_params(), lr=o.gamma)
        return opts

    # -- training ------------------------------------------------------------------------------
    def adversarial(self, x: torch.Tensor, y: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        """The training attack on the full inference path (CE, eval mode, inputs in [0, 1])."""
        if self.opts.attack == "apgd-ce":
            return apgd_ce(self.model, x, y, self.train_eps if eps is None else eps, self.ctx.cfg.attack_steps,
                           self.ctx.generator)
        if eps is None:
            return self.attack(self.model, x, y)
        return pgd_ce(self.model, x, y, eps, self.ctx.cfg.attack_steps, self.ctx.step_size, generator=self.ctx.generator)

    def update_classifier(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Update 1: (F, C) on clean cross-entropy."""
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.step(self.optimizers["classifier"], loss)
        return {"loss_c": float(loss.detach()), "train_acc": float((logits.argmax(1) == y).float().mean())}

    def update_discriminator(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Update 2: D on L_D, features fixed (computed after update 1)."""
        with torch.no_grad():
            z, z_adv = self.model.features(x), self.model.features(x_adv)
        d_clean, d_adv = self.disc(z, y), self.disc(z_adv, y)
        loss = disc_loss(d_clean, d_adv, self.opts.form)
        out = {"loss_d": float(loss.detach()),
               "disc_acc": discriminator_accuracy(d_clean.detach(), d_adv.detach(), self.opts.form)}
        if self.opts.form == "wgan" and self.opts.gp_weight > 0:
            gp = gradient_penalty(self.disc, z, z_adv, y, self.ctx.generator)
            loss = loss + self.opts.gp_weight * gp
            out["gp"] = float(gp.detach())
        self.step(self.optimizers["disc"], loss)
        return out

    def update_features(self, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Update 3: F on L_F; D's weights are frozen for this step (no gradient is computed for them)."""
        for p in self.disc.parameters():
            p.requires_grad_(False)
        try:
            loss = feature_loss(self.disc(self.model.features(x_adv), y), self.opts.form)
            self.step(self.optimizers["features"], loss)
        finally:
            for p in self.disc.parameters():
                p.requires_grad_(True)
        return {"loss_f": float(loss.detach())}

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        x_adv = self.adversarial(x, y)
        metrics = self.update_classifier(x, y)
        metrics.update(self.update_discriminator(x, x_adv, y))
        if self.opts.update_features:
            metrics.update(self.update_features(x_adv, y))
        return metrics

    # -- diagnostics ---------------------------------------------------------------------------
    def epoch_diagnostics(self, val_x: torch.Tensor, val_y: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
        """D's accuracy on clean vs adversarial val features, the H-divergence estimate
        2 * |2 * acc - 1| (paper Eq. 6 / Fig. 3) and the feature sensitivity mean ||F(x) - F(x')||
        measured on the unit sphere (divided by feature_scale; 2 is the maximum)."""
        d_clean, d_adv, dist = [], [], []
        with eval_mode(self.model, self.disc):
            for i in range(0, len(val_y), batch_size):
                xb, yb = val_x[i:i + batch_size], val_y[i:i + batch_size]
                xa = self.adversarial(xb, yb, eps=self.ctx.eps)
                with torch.no_grad():
                    z, za = self.model.features(xb), self.model.features(xa)
                    d_clean.append(self.disc(z, yb))
                    d_adv.append(self.disc(za, yb))
                    dist.append((z - za).norm(dim=1) / self.feature_scale)
        acc = discriminator_accuracy(torch.cat(d_clean), torch.cat(d_adv), self.opts.form)
        return {"val_disc_acc": acc, "val_h_divergence": 2 * abs(2 * acc - 1),
                "val_feature_sensitivity": float(torch.cat(dist).mean())}


class AFDWgan(AFD):
    """AFD with the Wasserstein losses (``afd-wgan``, paper Eq. 11-12)."""

    name = "afd-wgan"
    Options = AFDWganOptions
