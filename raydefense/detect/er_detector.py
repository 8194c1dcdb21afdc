"""ER-Detector (Li et al., Section 3.3 and Algorithm 2): kernel densities of an ER-Classifier's codes.

One Gaussian KDE per class is fitted on the training codes (ER1: the code z; ER2: z concatenated
with the encoder's hidden-layer means), with the bandwidth chosen by cross-validated likelihood
(``GridSearchCV``). An input is scored by its log density under the KDE of its *predicted* class; a
logistic regression on that score (adversarial = positive) is trained on 20 % of the test split
(set I) and evaluated on the other 80 % (set II), giving the paper's Table 4 metrics for every
train-attack x test-attack pair (Tables 5-8).

The attacks target the classifier only (the paper's setting): the detector is not attacked, so
these numbers are no white-box robustness claim for the combined system.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from raydefense.attacks import eval_mode
from raydefense.errors import UserError
from raydefense.evaluate.detection import auroc, er_table4

log = logging.getLogger(__name__)

FEATURES = ("er1", "er2")
BANDWIDTHS = tuple(float(b) for b in np.logspace(-1.5, 1.0, 11))  # on standardized features
TABLE_COLUMNS = ("train_attack", "test_attack", "detector", "acc_nadv", "acc_adv", "acc_cla", "acc_com", "acc_plain",
                 "auroc",
                 "bandwidth", "n_adv", "n_nat")

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, float, "torch.Generator | None"], torch.Tensor]


# -- attacks -------------------------------------------------------------------------------------
def _cw(model, x, y, eps, gen):
    """Carlini-Wagner L2 (torchattacks reference implementation; unbounded, eps unused)."""
    import torchattacks

    with eval_mode(model):
        return torchattacks.CW(model, c=1.0, kappa=0.0, steps=100, lr=0.01)(x, y).detach()


def detection_attack(name: str) -> AttackFn:
    """fgsm, pgd (= PGD-20, step eps/4, random start), cw, or any name of the evaluate ATTACKS table."""
    from raydefense.evaluate.attacks import ATTACKS

    if name == "cw":
        return _cw
    key = {"pgd": "pgd20"}.get(name, name)
    if key not in ATTACKS or key == "clean":
        raise UserError(f"unknown detection attack {name!r}; choose fgsm, pgd, cw or one of "
                        f"{', '.join(a for a in ATTACKS if a != 'clean')}")
    return ATTACKS[key].fn


def craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackFn, eps: float,
          batch_size: int = 256, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with eval_mode(model):
        return torch.cat([attack(model, x[i:i + batch_size], y[i:i + batch_size], eps, gen)
                          for i in range(0, len(y), batch_size)])


# -- features and densities ---------------------------------------------------------------------
@torch.no_grad()
def code_features(net: nn.Module, x: torch.Tensor, kind: str = "er1", batch_size: int = 512) -> np.ndarray:
    """ER1: the code; ER2: the code concatenated with the encoder's hidden-layer means."""
    if kind not in FEATURES:
        raise UserError(f"unknown detector features {kind!r}; choose er1 or er2")
    out = []
    with eval_mode(net):
        for i in range(0, len(x), batch_size):
            z, hidden = net.encoder.code_and_hidden(x[i:i + batch_size])
            out.append(z if kind == "er1" else torch.cat([z, hidden], 1))
    return torch.cat(out).cpu().double().numpy()


@torch.no_grad()
def predict(net: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    with eval_mode(net):
        return torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).cpu().numpy()


@dataclass
class ClassKDE:
    """One Gaussian KDE per class on standardized features, bandwidth by cross-validation."""

    bandwidths: Sequence[float] = BANDWIDTHS
    cv: int = 3
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    kdes: dict[int, object] = field(default_factory=dict)
    chosen: dict[int, float] = field(default_factory=dict)

    def fit(self, feats: np.ndarray, labels: np.ndarray) -> "ClassKDE":
        from sklearn.model_selection import GridSearchCV
        from sklearn.neighbors import KernelDensity

        self.mean = feats.mean(0)
        self.scale = feats.std(0) + 1e-8
        z = (feats - self.mean) / self.scale
        for c in np.unique(labels):
            zc = z[labels == c]
            if len(zc) < 2:
                raise UserError(f"class {c} has {len(zc)} training sample(s): too few for a density")
            search = GridSearchCV(KernelDensity(kernel="gaussian"), {"bandwidth": list(self.bandwidths)},
                                  cv=min(self.cv, len(zc)))
            search.fit(zc)
            self.kdes[int(c)] = search.best_estimator_
            self.chosen[int(c)] = float(search.best_params_["bandwidth"])
        return self

    def score(self, feats: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Log density of each sample under the KDE of the class given for it (its prediction)."""
        z = (feats - self.mean) / self.scale
        out = np.full(len(z), -np.inf)
        for c in np.unique(classes):
            mask = classes == c
            if int(c) in self.kdes:
                out[mask] = self.kdes[int(c)].score_samples(z[mask])
        return np.maximum(out, -1e6)  # a class never seen in training: lowest possible density

    @property
    def bandwidth(self) -> float:
        return float(np.median(list(self.chosen.values()))) if self.chosen else math.nan


class ScoreDetector:
    """Logistic regression on the density score; adversarial (low density) is the positive class."""

    def fit(self, score_nat: np.ndarray, score_adv: np.ndarray) -> "ScoreDetector":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        s = np.concatenate([score_nat, score_adv])[:, None]
        labels = np.concatenate([np.zeros(len(score_nat)), np.ones(len(score_adv))])
        if len(np.unique(labels)) < 2:
            raise UserError("the detector needs natural and adversarial examples in set I")
        self.model = make_pipeline(StandardScaler(), LogisticRegression()).fit(s, labels)
        return self

    def flags(self, score: np.ndarray) -> np.ndarray:
        return self.model.predict(score[:, None]).astype(bool)

    def prob(self, score: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(score[:, None])[:, 1]


# -- the whole protocol ---------------------------------------------------------------------------
def split_indices(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Set I (``fraction`` of the test split, detector training) and set II (evaluation)."""
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(fraction * n)))
    return order[:k], order[k:]


@dataclass
class DetectionData:
    """Everything the tables need: clean and adversarial test inputs and the training inputs."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    adversarial: dict[str, torch.Tensor]  # attack name -> adversarial version of test_x


def detection_tables(net: nn.Module, data: DetectionData, train_attacks: Iterable[str], test_attacks: Iterable[str],
                     kinds: Iterable[str] = FEATURES, fraction: float = 0.2, seed: int = 0) -> list[dict]:
    """Table 4 metrics on set II for every (detector features, train attack, test attack)."""
    train_attacks, test_attacks = list(train_attacks), list(test_attacks)
    first, second = split_indices(len(data.test_y), fraction, seed)
    y = data.test_y.cpu().numpy()
    pred_nat = predict(net, data.test_x)
    pred_adv = {a: predict(net, xa) for a, xa in data.adversarial.items()}
    rows = []
    for kind in kinds:
        kde = ClassKDE().fit(code_features(net, data.train_x, kind), data.train_y.cpu().numpy())
        log.info("%s: KDE bandwidths per class %s", kind, kde.chosen)
        s_nat = kde.score(code_features(net, data.test_x, kind), pred_nat)
        s_adv = {a: kde.score(code_features(net, xa, kind), pred_adv[a]) for a, xa in data.adversarial.items()}
        for ta in train_attacks:
            det = ScoreDetector().fit(s_nat[first], s_adv[ta][first])
            for te in test_attacks:
                flag_adv, flag_nat = det.flags(s_adv[te][second]), det.flags(s_nat[second])
                correct = pred_adv[te][second] == y[second]
                rows.append({"train_attack": ta, "test_attack": te, "detector": kind,
                             **er_table4(flag_adv, correct, flag_nat),
                             "acc_plain": float(correct.mean()),  # the classifier alone: what acc_com improves on
                             "auroc": auroc(det.prob(s_adv[te][second]), det.prob(s_nat[second])),
                             "bandwidth": kde.bandwidth, "n_adv": int(len(second)), "n_nat": int(len(second))})
    return rows


def tsne_plot(net: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, path, title: str = "",
              seed: int = 0) -> None:
    """2-D t-SNE of clean (dots) and adversarial (crosses) codes, coloured by true class (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    codes = np.concatenate([code_features(net, x, "er1"), code_features(net, x_adv, "er1")])
    emb = TSNE(2, perplexity=min(30.0, (len(codes) - 1) / 3), random_state=seed, init="pca").fit_transform(codes)
    labels = y.cpu().numpy()
    n = len(x)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(emb[:n, 0], emb[:n, 1], c=labels, cmap="tab10", s=8, marker="o", label="clean")
    ax.scatter(emb[n:, 0], emb[n:, 1], c=labels, cmap="tab10", s=14, marker="x", label="adversarial")
    legend = ax.legend(loc="best")
    for handle in legend.legend_handles:  # the legend shows the marker, not one class's colour
        handle.set_color("black")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def er_network(method) -> nn.Module:
    """The ERNet of a loaded method, or a clear error for checkpoints the detector cannot use."""
    net = method.inference_module()
    if not hasattr(getattr(net, "encoder", None), "code_and_hidden"):
        raise UserError(f"detect needs an er, er- or er-trades checkpoint, got method {method.name!r}")
    return net


def detect_checkpoint(ckpt_dir, train_attacks: Sequence[str] = ("pgd",), test_attacks: Sequence[str] = ("fgsm", "pgd", "cw"),
                      n: int | None = None, eps: float | None = None, out=None, kinds: Sequence[str] = FEATURES,
                      seed: int = 0, device: str = "auto", tsne: bool = False, batch_size: int = 256):
    """Run the ER-Detector protocol on a checkpoint's test split; writes detect.parquet and detect.md
    (and tsne_<attack>.png per train attack with ``tsne``). Returns (rows, out_dir)."""
    from pathlib import Path

    from raydefense.checkpoint import atomic_write_bytes, load_method, read_config
    from raydefense.data import format_eps, load_splits
    from raydefense.device import resolve_device
    from raydefense.evaluate import checkpoint_dataset
    from raydefense.provenance import provenance
    from raydefense.report import markdown_table, write_parquet

    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    attacks = {a: detection_attack(a) for a in dict.fromkeys([*train_attacks, *test_attacks])}
    for k in kinds:
        if k not in FEATURES:
            raise UserError(f"unknown detector features {k!r}; choose er1 or er2")
    dev = resolve_device(device)
    net = er_network(load_method(ckpt_dir, dev))
    name, data_dir = checkpoint_dataset(config)
    splits = load_splits(name, data_dir)
    eps = splits.info.standard_eps if eps is None else eps
    if eps < 0:
        raise UserError(f"eps must be >= 0, got {eps}")
    train_x, train_y = (t.to(dev) for t in splits.train.tensors())
    x, y = (t.to(dev) for t in splits.test.tensors())
    if n is not None:
        if n < 10:
            raise UserError(f"--n must be >= 10 (set I and set II both need samples), got {n}")
        x, y = x[:n], y[:n]
    adversarial = {a: craft(net, x, y, fn, eps, batch_size, seed) for a, fn in attacks.items()}
    rows = detection_tables(net, DetectionData(train_x, train_y, x, y, adversarial), train_attacks, test_attacks,
                            kinds, seed=seed)
    for r in rows:
        r["eps"] = eps
    out_dir = Path(out) if out else ckpt_dir
    write_parquet(rows, out_dir / "detect.parquet", metadata={"provenance": provenance()})
    lines = [f"# ER-Detector on `{ckpt_dir}`", "",
             f"- {name} test split, n={len(y)}: detector trained on set I (20 %), metrics on set II (80 %)",
             f"- eps {format_eps(eps)} (L-inf attacks; cw is L2 and unbounded); attacks target the classifier only",
             "", markdown_table(rows, TABLE_COLUMNS), ""]
    if tsne:
        for a in train_attacks:
            path = out_dir / f"tsne_{a}.png"
            tsne_plot(net, x[:500], adversarial[a][:500], y[:500], path, f"{config['train']['method']}: clean vs {a}", seed)
            lines.append(f"![t-SNE clean vs {a}]({path.name})")
    atomic_write_bytes(out_dir / "detect.md", ("\n".join(lines) + "\n").encode())
    return rows, out_dir
