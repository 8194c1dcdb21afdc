"""ER-Classifier (Li et al.): an encoder to a low-dimensional code, a classifier on the code, and a
WGAN critic that pulls the distribution of codes towards an N(0, I) prior.

Three updates per batch (METHODS.md, section er; Algorithm 1 of the paper):

1. the critic D ascends ``lambda * (mean D(z_prior) - mean D(Q(x)))``, then its weights are
   clipped to +-``clip`` (WGAN);
2. encoder Q and classifier C descend the classification loss (``er``: by default the mean of
   clean and adversarial CE, as the authors' code; ``er_loss=adv`` the paper's adversarial-only
   min-max; plain CE for ``er-``, TRADES for ``er-trades``);
3. Q ascends ``lambda * mean D(Q(x))``.

How step 3 is taken (``reg_step``): ``joint`` (default) folds it into step 2 as one step of the
main optimizer on ``CE - lambda * mean D(Q(x))`` (the critic already updated, its gradient
discarded), so Q's CE and regularisation share one optimizer state and lambda is their relative
weight; ``shared`` is the authors' order: a second step of the same optimizer (state shared, so its
momentum and weight decay act twice per batch); ``separate`` gives Q its own Adam (``encoder_lr``),
which is invariant to the scale of its loss: lambda is then inert (measured: lambda 0.01 and 10
moved the encoder the same), kept only to compare with earlier runs.

The codes that the critic sees (steps 1 and 3) are those of every input of step 2: clean and
adversarial for ``er`` and ``er-trades``, clean for ``er-`` (Algorithm 1 regularizes the
adversarial codes; regularizing both keeps the clean codes on the prior too).

Code size defaults: 16 for colour images and 4 for 1-channel 28x28 images (ref. code); 8 for 8x8
digits (a choice between the two, not tuned; ``code_dim`` is an option for ``raydefense tune``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import eval_mode, pgd_ce
from raydefense.methods.base import Method
from raydefense.methods.baselines import trades_adversary
from raydefense.models import build_backbone
from raydefense.models.normalize import Normalize


@dataclass
class EROptions:
    code_dim: Optional[int] = None  # None: 16 colour, 4 for 28x28 grey, 8 for 8x8 digits
    lam: float = 1.0  # lambda: weight of the embedding regularization (critic and encoder steps)
    critic_lr: float = 5e-4  # Adam, betas (0.5, 0.999)
    encoder_lr: float = 5e-4  # Adam of the encoder's regularization step, reg_step=separate only
    reg_step: Literal["joint", "shared", "separate"] = "joint"  # module docstring
    er_loss: Literal["mean", "adv"] = "mean"  # er: mean of clean+adv CE (authors' code) or adv only (paper)
    critic_hidden: int = 64
    clip: float = 0.01  # WGAN weight clipping of the critic
    classifier_hidden: int = 64
    attack_labels: Literal["predicted", "true"] = "predicted"  # PGD labels (ref. code: predicted)
    beta: float = 6.0  # TRADES weight (er-trades only)


def default_code_dim(shape: tuple[int, int, int]) -> int:
    if shape[0] == 3:
        return 16
    return 8 if shape[1] <= 8 else 4


class Encoder(nn.Module):
    """Normalize -> backbone -> linear map to the code. ``hidden_means`` gives one scalar per
    backbone stage (the mean of that stage's output): ER2's extra clues for the detector."""

    def __init__(self, backbone: nn.Module, code_dim: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.to_code = nn.Linear(backbone.out_dim, code_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_code(self.backbone(self.normalize(x)))

    def code_and_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.normalize(x)
        means = []
        for block in self.backbone.blocks:
            h = block(h)
            means.append(h.flatten(1).mean(1))
        return self.to_code(h), torch.stack(means, 1)


def mlp(inp: int, hidden: int, out: int, he_init: bool = True) -> nn.Sequential:
    """Two hidden ReLU layers. He init (as the backbones): PyTorch's default init left the deep
    encoder -> code -> MLP stack on a long plateau on digits."""
    net = nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))
    if he_init:
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(net[-1].weight)  # zero output layer: SGD at lr 0.1 diverged with He init there
    return net


class ERNet(nn.Module):
    """Inference path: images in [0, 1] -> encoder -> code -> classifier -> logits."""

    def __init__(self, encoder: Encoder, classifier: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def clip_weights(module: nn.Module, c: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.clamp_(-c, c)


class ERClassifier(Method):
    """``er``: min-max PGD training with the embedding regularization."""

    name = "er"
    Options = EROptions
    adversarial = True

    def build(self) -> None:
        info = self.ctx.info
        k = self.opts.code_dim or default_code_dim(info.shape)
        self.code_dim = k
        encoder = Encoder(build_backbone(self.ctx.arch, info), k, info.mean, info.std)
        self.net = ERNet(encoder, mlp(k, self.opts.classifier_hidden, info.num_classes))
        self.critic = mlp(k, self.opts.critic_hidden, 1, he_init=False)
        clip_weights(self.critic, self.opts.clip)
        # fixed prior sample for the per-epoch Wasserstein estimate (comparable across epochs)
        self._prior_gen = torch.Generator().manual_seed(self.ctx.cfg.seed + 7)

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "critic": self.critic}

    def inference_module(self) -> nn.Module:
        return self.net

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        o = self.opts
        optimizers = {"main": self.make_optimizer(self.net.parameters()),
                      "critic": torch.optim.Adam(self.critic.parameters(), lr=o.critic_lr, betas=(0.5, 0.999))}
        if o.reg_step == "separate":
            optimizers["encoder"] = torch.optim.Adam(self.net.encoder.parameters(), lr=o.encoder_lr, betas=(0.5, 0.999))
        return optimizers

    # -- pieces --------------------------------------------------------------------------------
    def prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.code_dim, generator=generator).to(self.ctx.device)

    def wasserstein(self, codes: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """The critic's estimate: mean D(prior) - mean D(codes) (up to the critic's Lipschitz scale)."""
        return self.critic(prior).mean() - self.critic(codes).mean()

    def adversarial_examples(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.opts.attack_labels == "predicted":
            with torch.no_grad(), eval_mode(self.net):
                y = self.net(x).argmax(1)
        return pgd_ce(self.net, x, y, self.train_eps, self.ctx.cfg.attack_steps, self.train_step_size,
                      generator=self.ctx.generator)

    def classification_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss, every input whose code is regularized, metrics)."""
        x_adv = self.adversarial_examples(x, y)
        both = torch.cat([x, x_adv])
        logits = self.net(both)
        if self.opts.er_loss == "adv":  # the paper's min-max: CE on the PGD examples only
            loss = F.cross_entropy(logits[len(x):], y)
        else:  # the authors' code: mean over clean and adversarial
            loss = F.cross_entropy(logits, torch.cat([y, y]))
        adv_acc = float((logits[len(x):].argmax(1) == y).float().mean())
        return loss, both, {"ce": float(loss.detach()), "train_adv_acc": adv_acc}

    # -- one batch -----------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        lam = self.opts.lam
        loss, inputs, metrics = self.classification_loss(x, y)

        # 1. critic: ascend lam * (D(prior) - D(Q(x))), then clip
        with torch.no_grad():
            codes = self.net.encoder(inputs)
        w = self.wasserstein(codes, self.prior(len(codes)))
        self.step(self.optimizers["critic"], -lam * w)
        clip_weights(self.critic, self.opts.clip)

        # 2. + 3. encoder + classifier descend the classification loss; the encoder ascends
        # lam * mean D(Q(x)) (critic weights untouched: no optimizer of the critic steps here)
        mode = self.opts.reg_step
        def reg() -> torch.Tensor:
            return -lam * self.critic(self.net.encoder(inputs)).mean()

        if mode == "joint":
            self.step(self.optimizers["main"], loss + reg())
        else:  # after step 2, on the updated encoder (the authors' order)
            self.step(self.optimizers["main"], loss)
            self.step(self.optimizers["main" if mode == "shared" else "encoder"], reg())
        self.critic.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "critic_w": float(w.detach()), **metrics}

    @torch.no_grad()
    def epoch_diagnostics(self, val_x: torch.Tensor, val_y: torch.Tensor) -> dict[str, float]:
        """The critic's Wasserstein estimate and an exact sliced W1 between val codes and the prior."""
        codes = torch.cat([self.net.encoder(val_x[i:i + 512]) for i in range(0, len(val_x), 512)])
        gen = torch.Generator().manual_seed(self.ctx.cfg.seed + 7)
        prior = self.prior(len(codes), gen)
        return {"val_critic_w": float(self.wasserstein(codes, prior)),
                "val_sliced_w": sliced_wasserstein(codes, prior, gen),
                "val_code_std": float(codes.std(0).mean())}


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None,
                       projections: int = 64) -> float:
    """Mean over random unit directions of the exact 1-D W1 between the projected samples
    (equal sample sizes): a critic-free check on the critic's estimate."""
    dirs = torch.randn(a.shape[1], projections, generator=generator).to(a.device)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a @ dirs).sort(0)
    pb, _ = (b @ dirs).sort(0)
    return float((pa - pb).abs().mean())


class ERMinus(ERClassifier):
    """``er-``: no attack; plain CE on clean codes plus the regularization."""

    name = "er-"
    adversarial = False
    selection_metric = "val_clean_acc"  # no attack in training: keep the most accurate epoch (as natural)

    def classification_loss(self, x, y):
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        return loss, x, {"ce": float(loss.detach()), "train_acc": float((logits.argmax(1) == y).float().mean())}


class ERTrades(ERClassifier):
    """``er-trades``: TRADES' CE(clean) + beta * KL(C(Q(x)) || C(Q(x'))) on the code path."""

    name = "er-trades"

    def classification_loss(self, x, y):
        ctx = self.ctx
        x_adv = trades_adversary(self.net, x, self.train_eps, ctx.cfg.attack_steps, self.train_step_size,
                                 ctx.generator)
        both = torch.cat([x, x_adv])
        logits, logits_adv = self.net(both).split(len(x))
        natural = F.cross_entropy(logits, y)
        robust = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean")
        loss = natural + self.opts.beta * robust
        return loss, both, {"ce": float(natural.detach()), "kl": float(robust.detach()),
                            "train_adv_acc": float((logits_adv.argmax(1) == y).float().mean())}
