"""Run attacks on a model and keep per-sample results, so the worst case is exact.

A sample counts as robust only if every attack (clean included) leaves it correctly classified:
the ``worst-case`` row is the per-sample AND over all attacks, never the minimum of accuracies.

Randomness is derived per batch from (seed, attack, index of the batch's first sample), and shards
are whole batches, so an evaluation split over Ray workers (``workers``) gives the single-process
result sample for sample. Each (attack, shard) result is cached under ``cache_dir`` with a key
over everything that determines it (model weights, data, budget, attack parameters, seed, batch
size), so a crashed evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import eval_mode
from raydefense.attacks.shards import auto_shards, cpu_attack_shards
from raydefense.evaluate.attacks import GRADIENT_FREE, LARGE_EPS_LINF, MIN_NORM, NONE, REFERENCE, TRANSFER, \
    WHITE_BOX, EvalAttack

log = logging.getLogger(__name__)

WORST = "worst-case"


@dataclass
class AttackResult:
    attack: str
    eps: float
    correct: torch.Tensor  # bool per sample
    seconds: float
    params: dict = field(default_factory=dict)
    norm: str = "linf"
    kind: str = WHITE_BOX
    steps: int | None = None

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.correct) else float("nan")


@dataclass
class EvalResult:
    results: list[AttackResult]
    n: int
    flags: list[str] = field(default_factory=list)
    probes: list[AttackResult] = field(default_factory=list)  # sanity probes: not in the table or worst case
    diagnostics: dict = field(default_factory=dict)
    flag_details: list[dict] = field(default_factory=list)  # {code, message, attacks}

    def by_name(self) -> dict[str, AttackResult]:
        return {r.attack: r for r in self.results}

    def worst_case(self) -> torch.Tensor:
        correct = torch.ones(self.n, dtype=torch.bool)
        for r in self.results:
            correct &= r.correct
        return correct


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def batch_seed(seed: int, attack: str, start: int) -> int:
    """Per-batch seed that depends only on the batch's global position, never on the sharding."""
    return zlib.crc32(f"{seed}:{attack}:{start}".encode())


def shard_bounds(n: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Split [0, n) into at most ``workers`` contiguous shards made of whole batches."""
    starts = list(range(0, n, batch_size))
    workers = max(1, min(workers, len(starts)))
    per, extra = divmod(len(starts), workers)
    bounds, k = [], 0
    for w in range(workers):
        count = per + (1 if w < extra else 0)
        first = starts[k]
        k += count
        bounds.append((first, starts[k] if k < len(starts) else n))
    return bounds


def run_span(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: EvalAttack, budget: float, offset: int,
             batch_size: int, seed: int) -> tuple[torch.Tensor, float]:
    """Attack samples [offset, offset + len(x)) batch by batch; returns per-sample correctness and seconds."""
    tic = time.perf_counter()
    correct = []
    with eval_mode(model):
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if attack.kind == NONE:
                xa = xb
            else:
                gen = torch.Generator(device=x.device).manual_seed(batch_seed(seed, attack.name, offset + i))
                xa = attack.fn(model, xb, yb, budget, gen)
                _check_inside_ball(xa, xb, budget, attack)
            correct.append((_predict(model, xa, batch_size) == yb).cpu())
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool), time.perf_counter() - tic


def _check_inside_ball(xa: torch.Tensor, x: torch.Tensor, eps: float, attack: EvalAttack) -> None:
    """An attack that leaves [0,1] or its eps-ball would report a meaningless number: refuse it."""
    if not torch.isfinite(xa).all() or xa.min() < -1e-6 or xa.max() > 1 + 1e-6:
        raise RuntimeError(f"attack {attack.name} left [0,1]: this is a bug, not a result")
    dist = (xa - x).abs().flatten(1).amax(1) if attack.norm == "linf" else (xa - x).flatten(1).norm(dim=1)
    if dist.max() > eps * (1 + 1e-4) + 1e-5:
        raise RuntimeError(f"attack {attack.name} left its {attack.norm} ball ({float(dist.max()):.4g} > {eps:.4g}): "
                           "this is a bug, not a result")


def fingerprint(*objs) -> str:
    """A short hash of tensors / models / JSON-able values (the cache key)."""
    h = hashlib.sha256()
    for obj in objs:
        if isinstance(obj, nn.Module):
            for k, v in obj.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, torch.Tensor):
            h.update(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class ShardCache:
    """Per-attack per-shard results as small JSON files: ``<dir>/<attack>/<start>-<stop>-<key>.json``."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None

    def path(self, attack: str, start: int, stop: int, key: str) -> Path | None:
        safe = attack.replace("/", "_").replace("@", "_at_")
        return self.root / safe / f"{start}-{stop}-{key}.json" if self.root else None

    def get(self, attack: str, start: int, stop: int, key: str) -> tuple[torch.Tensor, float] | None:
        p = self.path(attack, start, stop, key)
        if p is None or not p.exists():
            return None
        try:
            data = json.loads(p.read_text())
            correct, seconds = torch.tensor(data["correct"], dtype=torch.bool), float(data["seconds"])
            if correct.shape != (stop - start,):
                raise ValueError(f"{len(correct)} results for {stop - start} samples")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            log.warning("ignoring the corrupt cache entry %s (%s); recomputing it", p, exc)
            return None
        return correct, seconds

    def put(self, attack: str, start: int, stop: int, key: str, correct: torch.Tensor, seconds: float) -> None:
        from raydefense.checkpoint import atomic_write_bytes

        p = self.path(attack, start, stop, key)
        if p is not None:
            atomic_write_bytes(p, json.dumps({"attack": attack, "start": start, "stop": stop, "seconds": seconds,
                                              "correct": [int(c) for c in correct.tolist()]}).encode())


def _ray_span(model, x, y, attack, budget, offset, batch_size, seed, threads):
    torch.set_num_threads(threads)
    return run_span(model, x, y, attack, budget, offset, batch_size, seed)


def run_attacks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[EvalAttack], eps: float,
                batch_size: int = 256, seed: int = 0,
                on_attack: Callable[[str, int, int], None] | None = None, *, eps_l2: float | None = None,
                workers: int = 1, cache_dir: str | Path | None = None, probes: list[EvalAttack] | None = None,
                diagnose: bool = True) -> EvalResult:
    """Evaluate ``model`` (the full inference path) under each attack, in eval mode.

    ``workers > 1`` shards the samples over Ray tasks (one CPU each); ``cache_dir`` keeps each
    (attack, shard) result so a rerun skips finished work; ``probes`` are extra attacks behind the
    sanity flags, reported apart from the battery.
    """
    probes = list(probes or [])
    everything = list(attacks) + probes
    bounds = shard_bounds(len(y), batch_size, workers)
    cache = ShardCache(Path(cache_dir) if cache_dir else None)
    base_key = fingerprint(model, x, y) if cache.root else ""
    budgets = {a.name: a.budget(eps, eps_l2) for a in everything}

    def key(a: EvalAttack, start: int, stop: int) -> str:
        return fingerprint(base_key, a.name, a.params, a.norm, budgets[a.name], seed, batch_size, start, stop) \
            if cache.root else ""

    parts: dict[tuple[str, int], tuple[torch.Tensor, float]] = {}
    todo = []
    for a in everything:
        for start, stop in bounds:
            hit = cache.get(a.name, start, stop, key(a, start, stop))
            if hit is not None:
                log.info("%s [%d, %d): cached", a.name, start, stop)
                parts[(a.name, start)] = hit
            else:
                todo.append((a, start, stop))

    done_count: dict[str, int] = {a.name: sum((a.name, s) in parts for s, _ in bounds) for a in everything}
    finished = [0]

    def record(a: EvalAttack, start: int, stop: int, correct: torch.Tensor, seconds: float) -> None:
        parts[(a.name, start)] = (correct, seconds)
        cache.put(a.name, start, stop, key(a, start, stop), correct, seconds)
        done_count[a.name] += 1
        if done_count[a.name] == len(bounds):
            finished[0] += 1
            if on_attack is not None and a.kind != "probe":
                on_attack(a.name, sum(done_count[b.name] == len(bounds) for b in attacks), len(attacks))

    if len(bounds) > 1 and todo:
        _run_on_ray(model, x, y, todo, budgets, batch_size, seed, record)
    else:
        # raydefense's own PGD attacks use this process's threads as batch shards for small models
        # (same results; raydefense.attacks.shards.auto_shards says when)
        n_params = sum(p.numel() for p in model.parameters())
        with cpu_attack_shards(auto_shards(0, torch.get_num_threads(), x.device, n_params)):
            for a, start, stop in todo:
                correct, seconds = run_span(model, x[start:stop], y[start:stop], a, budgets[a.name], start, batch_size, seed)
                log.info("%s [%d, %d): %.4f (%.1fs)", a.name, start, stop, float(correct.float().mean()), seconds)
                record(a, start, stop, correct, seconds)

    def assemble(a: EvalAttack) -> AttackResult:
        chunks = [parts[(a.name, s)] for s, _ in bounds]
        return AttackResult(a.name, budgets[a.name], torch.cat([c for c, _ in chunks]), sum(t for _, t in chunks),
                            {**a.params, "norm": a.norm, "kind": a.kind}, a.norm, a.kind, a.steps)

    result = EvalResult([assemble(a) for a in attacks], len(y), probes=[assemble(a) for a in probes])
    if diagnose:
        result.diagnostics = diagnostics(model, x, y, batch_size)
    result.diagnostics["eps"] = eps
    result.flag_details = sanity_flags(result)
    result.flags = [f["message"] for f in result.flag_details]
    return result


def _run_on_ray(model, x, y, todo, budgets, batch_size, seed, record) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, len({s for _, s, _ in todo})), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    gpu = 1.0 / max(1, len(todo)) if x.device.type == "cuda" else 0
    task = ray.remote(num_cpus=1, num_gpus=gpu)(_ray_span)
    model_ref = ray.put(model)
    threads = torch.get_num_threads()  # same thread count as the driver: bitwise-equal arithmetic
    pending = {}
    for a, start, stop in todo:
        ref = task.remote(model_ref, x[start:stop], y[start:stop], a, budgets[a.name], start, batch_size, seed,
                          threads)
        pending[ref] = (a, start, stop)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        a, start, stop = pending.pop(ready[0])
        correct, seconds = ray.get(ready[0])
        log.info("%s [%d, %d) on ray: %.4f (%.1fs)", a.name, start, stop, float(correct.float().mean()), seconds)
        record(a, start, stop, correct, seconds)


def diagnostics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict:
    """Input-gradient health and output determinism, the two signs of masking the accuracies miss."""
    zero = nan = 0
    num_classes = None
    with eval_mode(model):
        for i in range(0, len(y), batch_size):
            xb = x[i:i + batch_size].clone().requires_grad_(True)
            logits = model(xb)
            num_classes = logits.shape[1]
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y[i:i + batch_size], reduction="sum"), xb)
            flat = grad.flatten(1)
            nan += int((~torch.isfinite(flat)).any(1).sum())
            zero += int((flat == 0).all(1).sum())
        with torch.no_grad():
            xb = x[:batch_size]
            a, b = model(xb), model(xb)
            diff = float((a - b).abs().max())
            scale = float(a.abs().max()) + 1e-12
    return {"zero_grad_fraction": zero / max(1, len(y)), "nan_grad_fraction": nan / max(1, len(y)),
            "forward_max_diff": diff, "forward_rel_diff": diff / scale, "num_classes": num_classes}


def _tol(n: int, tol: float) -> float:
    return tol + 1.0 / max(1, n)  # one sample more or less is noise, not a finding


def sanity_flags(result: EvalResult, tol: float = 0.01) -> list[dict]:
    """The checks of METHODS.md on one evaluation: each returns {code, message, attacks}."""
    rs = result.results + result.probes
    acc = {r.attack: r.accuracy for r in rs}
    t = _tol(result.n, tol)
    flags: list[dict] = []

    def flag(code: str, message: str, attacks: list[str]) -> None:
        flags.append({"code": code, "message": f"[{code}] {message}", "attacks": attacks})

    # more steps must not raise accuracy (same norm, same budget, white-box PGD family)
    pgd = sorted((r for r in rs if r.steps is not None and r.kind in (WHITE_BOX, "probe") and r.norm == "linf"
                  and "restarts" in r.params and r.params.get("restarts", 1) == 1), key=lambda r: (r.eps, r.steps))
    for a in pgd:
        for b in pgd:
            if abs(a.eps - b.eps) < 1e-9 and b.steps > a.steps and b.accuracy > a.accuracy + t:
                flag("steps", f"{b.attack} ({b.accuracy:.3f}) above {a.attack} ({a.accuracy:.3f}) at the same eps: "
                     "more steps should not raise accuracy", [a.attack, b.attack])
    # accuracy must fall with eps (PGD-10 probes and clean)
    curve = sorted([(0.0, acc["clean"], "clean")] if "clean" in acc else [], key=lambda p: p[0])
    curve += sorted(((r.eps, r.accuracy, r.attack) for r in result.probes if r.steps == 10), key=lambda p: p[0])
    for (e0, a0, n0), (e1, a1, n1) in zip(curve, curve[1:]):
        if e1 > e0 and a1 > a0 + t:
            flag("eps-monotone", f"accuracy rises with eps: {n1} at eps {e1:.4g} ({a1:.3f}) above {n0} at eps "
                 f"{e0:.4g} ({a0:.3f})", [n0, n1])
    k = result.diagnostics.get("num_classes")
    large = [r for r in result.probes if r.eps >= LARGE_EPS_LINF - 1e-9]
    if k and large and large[0].accuracy > 1.0 / k + t:
        flag("large-eps", f"{large[0].attack} accuracy {large[0].accuracy:.3f} above chance ({1 / k:.3f}) at eps "
             f"{large[0].eps:.3g}: the attack cannot be working", [large[0].attack])
    # white-box must beat black-box and gradient-free attacks (L-inf, same budget)
    eps = result.diagnostics.get("eps")
    white = [r for r in rs if r.kind in (WHITE_BOX, "probe") and r.norm == "linf" and eps is not None
             and abs(r.eps - eps) < 1e-9]
    black = [r for r in rs if r.kind in (GRADIENT_FREE, TRANSFER) and r.norm == "linf"]
    if white and black:
        w = min(white, key=lambda r: r.accuracy)
        for b in black:
            if b.accuracy < w.accuracy - t:
                flag("black-box", f"{b.kind} attack {b.attack} ({b.accuracy:.3f}) beats the best white-box attack "
                     f"{w.attack} ({w.accuracy:.3f}): gradients are likely masked", [b.attack, w.attack])
    # reported AutoAttack must not exceed PGD
    pgd_acc = [r for r in rs if r.attack.startswith(("pgd", "probe-pgd10@eps")) and r.norm == "linf"
               and r.kind in (WHITE_BOX, "probe") and (eps is None or abs(r.eps - eps) < 1e-9)]
    aa = [r for r in rs if r.kind == REFERENCE]
    if aa and pgd_acc:
        p = min(pgd_acc, key=lambda r: r.accuracy)
        if aa[0].accuracy > p.accuracy + t:
            flag("aa-above-pgd", f"AutoAttack ({aa[0].accuracy:.3f}) above {p.attack} ({p.accuracy:.3f})",
                 [aa[0].attack, p.attack])
    if "clean" in acc:
        above = [r.attack for r in result.results if r.kind not in (NONE, MIN_NORM) and r.accuracy > acc["clean"] + t]
        if above:
            flag("above-clean", f"{', '.join(above)} raised accuracy above clean accuracy", above)
    d = result.diagnostics
    if d.get("nan_grad_fraction", 0) > 0 or d.get("zero_grad_fraction", 0) > 0.05:
        flag("gradients", f"input gradients: {d['zero_grad_fraction']:.1%} of samples all zero, "
             f"{d['nan_grad_fraction']:.1%} non-finite: gradient attacks see nothing", [])
    if d.get("forward_rel_diff", 0) > 1e-4:
        flag("randomized", f"two forward passes on the same input differ (max |diff| {d['forward_max_diff']:.3g}): "
             "the model is randomized; use EOT (--aa-version rand)", [])
    return flags
