"""RFD: robust feature disentanglement (Wang, Deng, Yoo, Lin).

The backbone is split: G = Normalize + the first k stages, and three encoders E_r, E_nr, E_ds are
independently initialized copies of the remaining stages. A shared linear classifier C reads robust
(z_r) and non-robust (z_nr) features, a 2-layer MLP discriminator D tells natural from adversarial
features, and a decoder R reconstructs G's features from concat(z_r, z_nr, z_ds).

Each loss gets its own optimizer step, in the reference code's order (METHODS.md):
CE robust (G, E_r, C) -> CE non-robust on x and through a gradient reversal layer on x' (E_nr)
-> angular distance of z_r, z_r' (G, E_r) -> pairwise dependence (encoders) -> D, then the
encoders against D -> L1 reconstruction (encoders, R). Inference is C(E_r(G(x))); the detector is
D(E_ds(G(x))) (logit of "adversarial").

Domain diversity: each batch's training PGD draws eps, steps and step size from configured sets
(in units of the dataset's eps_unit = standard_eps / 8, so CIFAR's 8..12 -> 8/255..12/255).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import eval_mode, pgd_ce
from raydefense.errors import UserError
from raydefense.methods.base import Method
from raydefense.models import build_backbone
from raydefense.models.normalize import Normalize

log = logging.getLogger(__name__)


@dataclass
class RFDOptions:
    # loss weights (one per term of METHODS.md)
    w_ce_r: float = 1.0  # CE on C(E_r(G(x'))) for G, E_r, C
    w_ce_r_clean: float = 0.0  # paper Eq. 7 also puts CE on C(E_r(G(x))); the reference code does not
    w_ce_nr: float = 1.0  # CE on C(E_nr(G(x))) for E_nr
    w_ce_nr_adv: float = 1.0  # CE on C(GRL(E_nr(G(x')))) for E_nr (gradient reversed)
    grl_lambda: float = 0.5  # gradient reversal constant (reference code: 0.5)
    w_angular: float = 1.0  # 1 - cos(z_r, z_r') for G, E_r
    w_dependence: float = 1.0  # pairwise (r,nr), (nr,ds), (ds,r) dependence on x and x' for the encoders
    dependence: str = "exp-neg-kl"  # "exp-neg-kl" (reference code: exp(-KL)) or "neg-kl" (paper: maximize KL)
    w_disc: float = 1.0  # BCE of D on nat vs adv features (all three kinds)
    w_adv: float = 1.0  # encoders against D: ds -> true domain, r / nr -> 0.5 confusion
    w_recon: float = 1.0  # L1 reconstruction of G(x), G(x') for the encoders and R
    aux_lr_scale: float = 0.1  # E_nr, E_ds, D, R learn at lr * this ("other components have a smaller lr")
    split: int = -1  # stages in G; -1: the per-arch default (all but the last two stages)
    disc_hidden: int = 256
    # domain diversity, in units of the dataset's eps_unit (standard_eps / 8)
    eps_min: float = 8.0
    eps_max: float = 12.0
    steps_choices: tuple[int, ...] = (8, 16, 24, 32)
    step_min: float = 2.0
    step_max: float = 4.0
    diversify: bool = True  # False: the fixed TrainConfig attack (eps, attack_steps, attack_step_size)


ENCODERS = ("E_r", "E_nr", "E_ds")
# loss -> the modules its optimizer step updates (METHODS.md, reference-code order)
LOSS_MODULES: dict[str, tuple[str, ...]] = {
    "ce_r": ("G", "E_r", "C"), "ce_nr": ("E_nr",), "angular": ("G", "E_r"), "dependence": ENCODERS,
    "disc": ("D",), "adv": ENCODERS, "recon": ENCODERS + ("R",),
}


class GradReverse(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by -lambda backward (Ganin et al.)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    return GradReverse.apply(x, lam)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(a_i, b_i): 0 when the robust features of x and x' point the same way."""
    return (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-8)).mean()


def channel_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(softmax(a) || softmax(b)) over feature channels, averaged over the batch."""
    la, lb = F.log_softmax(a.flatten(1), 1), F.log_softmax(b.flatten(1), 1)
    return (la.exp() * (la - lb)).sum(1).mean()


def dependence_loss(a: torch.Tensor, b: torch.Tensor, form: str) -> torch.Tensor:
    """Low when a and b differ: exp(-KL) (bounded, reference code) or -KL (paper's KL, maximized)."""
    kl = channel_kl(a, b)
    if form == "exp-neg-kl":
        return torch.exp(-kl)
    if form == "neg-kl":
        return -kl
    raise UserError(f"rfd: dependence must be exp-neg-kl or neg-kl, got {form!r}")


def default_split(arch: str, n_stages: int) -> int:
    """Stages kept in G: all but the last two, i.e. the last stage group (+ pooling head) forms
    each encoder. small-cnn: G = conv, conv/2 -> encoder = conv/2 + linear; PreAct ResNet-18:
    G = stem + layer1..3 -> encoder = layer4 + pooling (the paper: encoder = one residual group);
    WRN: G = stem + group1..2 -> encoder = group3 + pooling."""
    return max(1, n_stages - 2)


class Decoder(nn.Module):
    """concat(z_r, z_nr, z_ds) -> G's feature map: linear to a small map, transposed convolutions up."""

    def __init__(self, in_dim: int, target_shape: tuple[int, ...]):
        super().__init__()
        self.target_shape = tuple(target_shape)
        if len(target_shape) == 1:
            self.net = nn.Sequential(nn.Linear(in_dim, 2 * in_dim), nn.ReLU(), nn.Linear(2 * in_dim, target_shape[0]))
            return
        c, h, w = target_shape
        s = min(h, 4)
        mid = min(c, 128)
        layers: list[nn.Module] = [nn.Linear(in_dim, mid * s * s), nn.ReLU(), nn.Unflatten(1, (mid, s, s))]
        while s * 2 <= h:
            layers += [nn.ConvTranspose2d(mid, mid, 4, stride=2, padding=1), nn.ReLU()]
            s *= 2
        if s != h or h != w:
            layers.append(nn.Upsample(size=(h, w), mode="nearest"))
        layers.append(nn.Conv2d(mid, c, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class RobustClassifier(nn.Module):
    """The inference path C(E_r(G(x))): images in [0, 1] -> logits."""

    def __init__(self, g: nn.Module, e_r: nn.Module, c: nn.Module):
        super().__init__()
        self.g, self.e_r, self.c = g, e_r, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.e_r(self.g(x)))


class DomainDetector(nn.Module):
    """D(E_ds(G(x))): images in [0, 1] -> one logit per image, > 0 means "adversarial"."""

    def __init__(self, g: nn.Module, e_ds: nn.Module, d: nn.Module):
        super().__init__()
        self.g, self.e_ds, self.d = g, e_ds, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.e_ds(self.g(x))).squeeze(1)


class RFD(Method):
    name = "rfd"
    Options = RFDOptions

    def build(self) -> None:
        o, info, arch = self.opts, self.ctx.info, self.ctx.arch
        if not (0 < o.eps_min <= o.eps_max and 0 < o.step_min <= o.step_max and o.steps_choices
                and all(s > 0 for s in o.steps_choices)):
            raise UserError("rfd: need 0 < eps_min <= eps_max, 0 < step_min <= step_max and positive steps_choices")
        if o.dependence not in ("exp-neg-kl", "neg-kl"):
            raise UserError(f"rfd: dependence must be exp-neg-kl or neg-kl, got {o.dependence!r}")
        trunk = build_backbone(arch, info)
        n = len(trunk.blocks)
        k = default_split(arch, n) if o.split < 0 else o.split
        if not 1 <= k < n:
            raise UserError(f"rfd: split must be in 1..{n - 1} for {arch} ({n} stages), got {k}")
        self.split_at = k
        self.G = nn.Sequential(Normalize(info.mean, info.std), *trunk.blocks[:k])
        # each encoder: the remaining stages of an independently initialized backbone
        self.E_r, self.E_nr, self.E_ds = (nn.Sequential(*copy.deepcopy(build_backbone(arch, info).blocks[k:]))
                                          for _ in range(3))
        with torch.no_grad(), eval_mode(self.G, self.E_r):  # a shape probe must not touch BatchNorm statistics
            f = self.G(torch.zeros(2, *info.shape))
            z = self.E_r(f)
        if z.dim() != 2:
            raise UserError(f"rfd: the encoders of {arch} must end in a flat feature vector")
        d = z.shape[1]
        self.C = nn.Linear(d, info.num_classes)
        self.D = nn.Sequential(nn.Linear(d, o.disc_hidden), nn.ReLU(), nn.Linear(o.disc_hidden, 1))
        self.R = Decoder(3 * d, tuple(f.shape[1:]))
        self._draw_gen: torch.Generator | None = None
        self.last_draw: dict[str, float] = {}

    def modules(self) -> dict[str, nn.Module]:
        return {"G": self.G, "E_r": self.E_r, "E_nr": self.E_nr, "E_ds": self.E_ds, "C": self.C, "D": self.D,
                "R": self.R}

    def inference_module(self) -> nn.Module:
        return RobustClassifier(self.G, self.E_r, self.C)

    def detector(self) -> nn.Module:
        return DomainDetector(self.G, self.E_ds, self.D)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per loss over the modules that loss trains (its own step and momentum).

        Sharing one SGD optimizer between several steps of a batch would re-apply its momentum at
        every step (E_r is stepped by five losses). The robust CE trains at ``lr`` with weight
        decay; the other losses at ``lr * aux_lr_scale`` without it (decay once per batch).
        """
        lr, aux = self.ctx.cfg.lr, self.ctx.cfg.lr * self.opts.aux_lr_scale
        mods = self.modules()
        return {loss: self.make_optimizer([p for n in names for p in mods[n].parameters()],
                                          lr=lr if loss == "ce_r" else aux,
                                          **({} if loss == "ce_r" else {"weight_decay": 0.0}))
                for loss, names in LOSS_MODULES.items()}

    # -- domain diversity ------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        if self.ctx.generator is not None:
            return self.ctx.generator  # saved and restored by fit: resumed runs draw the same values
        if self._draw_gen is None:
            self._draw_gen = torch.Generator().manual_seed(self.ctx.cfg.seed + 7919)
        return self._draw_gen

    def draw_attack(self) -> dict[str, float]:
        """This batch's training attack: eps, steps, step size (input scale), warm-up applied."""
        o, ctx = self.opts, self.ctx
        if not o.diversify:
            return {"eps": self.train_eps, "steps": float(ctx.cfg.attack_steps), "step_size": self.train_step_size}
        gen = self._generator()
        u = torch.rand(3, generator=gen, device=gen.device).tolist()
        unit = ctx.info.eps_unit
        ramp = self.train_eps / ctx.eps if ctx.eps > 0 else 0.0
        steps = o.steps_choices[min(int(u[1] * len(o.steps_choices)), len(o.steps_choices) - 1)]
        return {"eps": ramp * unit * (o.eps_min + u[0] * (o.eps_max - o.eps_min)), "steps": float(steps),
                "step_size": ramp * unit * (o.step_min + u[2] * (o.step_max - o.step_min))}

    # -- training --------------------------------------------------------------------------------
    def _update(self, loss: torch.Tensor, name: str, weight: float = 1.0) -> float:
        """Step loss ``name``'s optimizer on weight * loss; a zero weight skips the step entirely."""
        value = float(loss.detach())
        if weight == 0:
            return value
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        (weight * loss).backward()
        self.optimizers[name].step()
        return value

    def _encode(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.E_r(f), self.E_nr(f), self.E_ds(f)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        o = self.opts
        draw = self.draw_attack()
        self.last_draw = draw
        robust = self.inference_module()
        x_adv = pgd_ce(robust, x, y, draw["eps"], int(draw["steps"]), draw["step_size"], generator=self.ctx.generator)
        out: dict[str, float] = {f"attack_{k}": v for k, v in draw.items()}
        bce = F.binary_cross_entropy_with_logits

        # 1. robust CE (G, E_r, C)
        logits_adv = robust(x_adv)
        loss = F.cross_entropy(logits_adv, y)
        if o.w_ce_r_clean:
            loss = loss + o.w_ce_r_clean / max(o.w_ce_r, 1e-12) * F.cross_entropy(robust(x), y)
        out["loss_ce_r"] = self._update(loss, "ce_r", o.w_ce_r)
        out["train_adv_acc"] = float((logits_adv.argmax(1) == y).float().mean())

        with torch.no_grad():  # G is not trained by the losses below (except the angular one)
            f, f_adv = self.G(x), self.G(x_adv)
        # 2. non-robust CE: correct on x, and through the gradient reversal layer on x' (E_nr)
        loss_nr = F.cross_entropy(self.C(self.E_nr(f)), y)
        loss_nr_adv = F.cross_entropy(self.C(grad_reverse(self.E_nr(f_adv), o.grl_lambda)), y)
        out["loss_ce_nr"], out["loss_ce_nr_adv"] = float(loss_nr.detach()), float(loss_nr_adv.detach())
        if o.w_ce_nr or o.w_ce_nr_adv:
            self._update(o.w_ce_nr * loss_nr + o.w_ce_nr_adv * loss_nr_adv, "ce_nr")

        # 3. angular distance of the robust features of x and x' (G, E_r)
        ang = angular_distance(self.E_r(self.G(x)), self.E_r(self.G(x_adv)))
        out["loss_angular"] = self._update(ang, "angular", o.w_angular)

        # 4. pairwise dependence between the three kinds, for x and x' (encoders)
        dep = 0.0
        for feats in (f, f_adv):
            zr, znr, zds = self._encode(feats)
            dep = dep + sum(dependence_loss(a, b, o.dependence) for a, b in ((zr, znr), (znr, zds), (zds, zr)))
        out["loss_dependence"] = self._update(dep / 6, "dependence", o.w_dependence)

        # 5. discriminator on all three kinds (D), then the encoders against it
        z_nat, z_adv = self._encode(f), self._encode(f_adv)
        logit_nat = torch.cat([self.D(z.detach()) for z in z_nat])
        logit_adv = torch.cat([self.D(z.detach()) for z in z_adv])
        loss_d = (bce(logit_nat, torch.zeros_like(logit_nat)) + bce(logit_adv, torch.ones_like(logit_adv))) / 2
        out["loss_disc"] = self._update(loss_d, "disc", o.w_disc)
        d_ds_nat, d_ds_adv = self.D(z_nat[2]), self.D(z_adv[2])
        with torch.no_grad():
            out["train_detect_acc"] = float(((d_ds_nat < 0).float().mean() + (d_ds_adv > 0).float().mean()) / 2)
        loss_ds = (bce(d_ds_nat, torch.zeros_like(d_ds_nat)) + bce(d_ds_adv, torch.ones_like(d_ds_adv))) / 2
        invariant = torch.cat([self.D(z) for z in (z_nat[0], z_nat[1], z_adv[0], z_adv[1])])
        loss_conf = bce(invariant, torch.full_like(invariant, 0.5))
        out["loss_adv_ds"], out["loss_adv_conf"] = float(loss_ds.detach()), float(loss_conf.detach())
        self._update(loss_ds + loss_conf, "adv", o.w_adv)

        # 6. L1 reconstruction of G's features from the three codes (encoders, R)
        rec = sum(F.l1_loss(self.R(torch.cat(self._encode(feats), 1)), feats) for feats in (f, f_adv)) / 2
        out["loss_recon"] = self._update(rec, "recon", o.w_recon)
        out["loss"] = out["loss_ce_r"]
        return out

    # -- validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        det = self.detector()
        return torch.cat([det(x[i:i + 512]) for i in range(0, len(x), 512)])

    def epoch_diagnostics(self, val_x: torch.Tensor, val_y: torch.Tensor) -> dict[str, float]:
        """Detector TPR / TNR on validation PGD (standard eps, the validation step count)."""
        ctx = self.ctx
        steps = max(1, ctx.cfg.val_attack_steps)
        robust = self.inference_module()
        with eval_mode(robust):
            x_adv = torch.cat([pgd_ce(robust, val_x[i:i + 512], val_y[i:i + 512], ctx.eps, steps, ctx.eps / 4,
                                      generator=ctx.generator) for i in range(0, len(val_y), 512)])
        s_adv, s_nat = self._scores(x_adv), self._scores(val_x)
        return {"val_detect_tpr": float((s_adv > 0).float().mean()), "val_detect_tnr": float((s_nat <= 0).float().mean())}


__all__ = ["RFD", "RFDOptions", "DomainDetector", "RobustClassifier", "angular_distance", "channel_kl",
           "default_split", "dependence_loss", "grad_reverse"]
