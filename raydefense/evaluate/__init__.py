"""``evaluate_checkpoint``: attack a checkpoint's full inference path on the test split and write
``eval.parquet`` (one row per attack: attack, eps, accuracy, n, plus norm, kind, params, flags),
``eval_samples.parquet`` (which samples each attack broke), optional sweep tables and plots, and
``report.md`` (tables, sanity flags, plots, the exact command and versions)."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

from raydefense.checkpoint import load_model, read_config
from raydefense.data import format_eps, load_splits
from raydefense.device import resolve_device
from raydefense.errors import UserError
from raydefense.names import DEFAULT_ATTACKS, EVAL_COLUMNS
from raydefense.evaluate.attacks import ATTACKS, EvalAttack, default_eps_l2, resolve_attacks, \
    sanity_probes
from raydefense.evaluate.runner import WORST, EvalResult, run_attacks
from raydefense.provenance import provenance
from raydefense.report import markdown_table, write_parquet

log = logging.getLogger(__name__)

CACHE_DIR = "eval_cache"


def checkpoint_dataset(config: dict) -> tuple[str, str | None]:
    """The dataset a checkpoint was trained on (name, data_dir)."""
    try:
        name = config["dataset"]["name"]
    except (KeyError, TypeError):
        raise UserError("checkpoint config.json names no dataset") from None
    return name, config.get("train", {}).get("data_dir") or config.get("data_dir")


def result_rows(result: EvalResult) -> list[dict]:
    """One row per attack plus the exact per-sample worst case; ``flags`` names the flags on each row."""
    codes = {}
    for f in result.flag_details:
        for a in f["attacks"]:
            codes.setdefault(a, []).append(f["code"])
    rows = [{"attack": r.attack, "norm": r.norm, "kind": r.kind, "eps": r.eps,
             "eps_label": format_eps(r.eps) if r.norm == "linf" else f"{r.eps:.3g}", "accuracy": r.accuracy,
             "n": result.n, "seconds": r.seconds, "params": json.dumps(r.params, sort_keys=True, default=str),
             "flags": ",".join(dict.fromkeys(codes.get(r.attack, [])))} for r in result.results]
    eps = result.diagnostics.get("eps", max((r.eps for r in result.results if r.norm == "linf"), default=0.0))
    rows.append({"attack": WORST, "norm": "all", "kind": "all", "eps": eps, "eps_label": format_eps(eps),
                 "accuracy": float(result.worst_case().float().mean()), "n": result.n,
                 "seconds": sum(r.seconds for r in result.results), "params": "{}",
                 "flags": ",".join(dict.fromkeys(f["code"] for f in result.flag_details))})
    norms = sorted({r.norm for r in result.results if r.kind != "none"})
    if len(norms) > 1:  # the overall worst case mixes threat models: also give one per norm
        clean = [r for r in result.results if r.kind == "none"]
        for norm in norms:
            part = clean + [r for r in result.results if r.norm == norm and r.kind != "none"]
            correct = part[0].correct.clone()
            for r in part[1:]:
                correct &= r.correct
            e = max(r.eps for r in part)
            rows.append({"attack": f"{WORST}-{norm}", "norm": norm, "kind": "all", "eps": e,
                         "eps_label": format_eps(e) if norm == "linf" else f"{e:.3g}",
                         "accuracy": float(correct.float().mean()), "n": result.n,
                         "seconds": sum(r.seconds for r in part), "params": "{}", "flags": ""})
    return rows


def evaluate_checkpoint(ckpt_dir: str | Path, attacks: str | list[str] = DEFAULT_ATTACKS, n: int | None = None,
                        eps: float | None = None, out: str | Path | None = None, split: str = "test",
                        batch_size: int = 256, seed: int = 0, device: str = "auto", data_dir: str | None = None,
                        on_attack: Callable[[str, int, int], None] | None = None, *, eps_l2: float | None = None,
                        aa_version: str = "standard", surrogate: str | Path | None = None, workers: int = 1,
                        probes: bool = True, eps_sweep: Sequence[float] | bool | None = None,
                        sweep_attacks: str | list[str] = "fgsm,pgd20", steps_sweep: Sequence[int] | bool | None = None,
                        cache: bool = True) -> tuple[list[dict], EvalResult, Path]:
    """Run the battery (and optional sweeps) on a checkpoint; write the tables and the report."""
    from raydefense.evaluate import sweeps

    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    dev = resolve_device(device)
    surrogate_model = load_model(surrogate, dev) if surrogate else None
    chosen = resolve_attacks(attacks, aa_version, surrogate_model, str(surrogate) if surrogate else "surrogate")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    model = load_model(ckpt_dir, dev)
    name, stored_dir = checkpoint_dataset(config)
    splits = load_splits(name, data_dir or stored_dir)
    x, y = splits[split].tensors()
    if n is not None:
        if n < 1:
            raise UserError(f"--n must be >= 1, got {n}")
        x, y = x[:n], y[:n]
    x, y = x.to(dev), y.to(dev)
    eps = splits.info.standard_eps if eps is None else eps
    eps_l2 = default_eps_l2(name) if eps_l2 is None else eps_l2
    if eps < 0 or eps_l2 < 0:
        raise UserError(f"eps must be >= 0, got {min(eps, eps_l2)}")
    out_dir = Path(out) if out else ckpt_dir
    cache_dir = out_dir / CACHE_DIR if cache else None
    result = run_attacks(model, x, y, chosen, eps, batch_size, seed, on_attack, eps_l2=eps_l2, workers=workers,
                         cache_dir=cache_dir, probes=sanity_probes() if probes else None)
    extra: dict = {}
    if eps_sweep:
        grid = sweeps.default_eps_grid(eps) if eps_sweep is True else list(eps_sweep)
        sweep_set = [a for a in resolve_attacks(sweep_attacks, aa_version, surrogate_model) if a.kind != "none"]
        rows_s, aucs, flags_s = sweeps.eps_sweep(model, x, y, sweep_set, grid, batch_size, seed, workers, cache_dir,
                                                 num_classes=result.diagnostics.get("num_classes"))
        write_parquet(rows_s, out_dir / "eps_sweep.parquet")
        write_parquet(aucs, out_dir / "eps_auc.parquet")
        sweeps.plot_eps(rows_s, out_dir / "eps_sweep.png", f"{ckpt_dir.name}: accuracy vs eps (n={len(y)})")
        extra.update(eps_rows=rows_s, aucs=aucs)
        _add_flags(result, flags_s)
    if steps_sweep:
        steps = sweeps.STEPS if steps_sweep is True else list(steps_sweep)
        rows_t, flags_t = sweeps.steps_sweep(model, x, y, eps, steps, batch_size, seed, workers, cache_dir)
        write_parquet(rows_t, out_dir / "steps_sweep.parquet")
        sweeps.plot_steps(rows_t, out_dir / "steps_sweep.png", f"{ckpt_dir.name}: PGD accuracy vs steps (eps {format_eps(eps)})")
        extra.update(steps_rows=rows_t)
        _add_flags(result, flags_t)
    rows = result_rows(result)

    write_parquet([{"sample": i, "attack": r.attack, "correct": bool(c)} for r in result.results + result.probes
                   for i, c in enumerate(r.correct.tolist())], out_dir / "eval_samples.parquet")
    write_parquet(rows, out_dir / "eval.parquet",
                  metadata={"flags": result.flags, "diagnostics": result.diagnostics, "provenance": provenance(),
                            "command": _command(), "eps": eps, "eps_l2": eps_l2, "seed": seed, "split": split})
    write_report(out_dir / "report.md", ckpt_dir, config, rows, result, chosen, split, extra)
    return rows, result, out_dir


def _add_flags(result: EvalResult, messages: list[str]) -> None:
    for m in messages:
        code = m[1:m.index("]")] if m.startswith("[") else "sweep"
        result.flag_details.append({"code": code, "message": m, "attacks": []})
        result.flags.append(m)


def _command() -> str:
    return " ".join(shlex.quote(a) for a in ["raydefense" if sys.argv[0].endswith(("raydefense", "__main__.py"))
                                             else sys.argv[0]] + sys.argv[1:])


def write_report(path: Path, ckpt_dir: Path, config: dict, rows: list[dict], result: EvalResult,
                 attacks: list[EvalAttack], split: str, extra: dict | None = None) -> None:
    from raydefense.checkpoint import atomic_write_bytes

    extra = extra or {}
    prov = provenance()
    verdict = "**unreliable** (see the sanity flags below)" if result.flags else "no sanity flag raised"
    d = result.diagnostics
    lines = [
        f"# Evaluation of `{ckpt_dir}`", "",
        f"- model: {config.get('kind')} {config.get('train', {}).get('method', '')}, "
        f"dataset {config.get('dataset', {}).get('name')} ({split} split, n={result.n})",
        f"- sanity: {verdict}",
        f"- command: `{_command()}`",
        f"- versions: {', '.join(f'{k} {v}' for k, v in prov.items())}", "",
        "Accuracy per attack; `worst-case` counts a sample as robust only if no attack broke it. "
        "eps is in input scale (images in [0, 1]) in the attack's own norm.", "",
        markdown_table(rows, EVAL_COLUMNS + ("flags",)), "", "## Attacks", "",
    ]
    lines += [f"- `{a.name}` ({a.kind}, {a.norm}): {a.description or ''} `{json.dumps(a.params, default=str)}`"
              for a in attacks]
    lines += ["", "## Sanity checks", "",
              f"- input gradients: {d.get('zero_grad_fraction', 0):.1%} of samples all zero, "
              f"{d.get('nan_grad_fraction', 0):.1%} non-finite",
              f"- two forward passes: max |diff| {d.get('forward_max_diff', 0):.3g}"]
    if result.probes:
        lines += ["- probes (PGD with step eps/4, random start; not in the table above): " +
                  ", ".join(f"{p.attack} {p.accuracy:.3f}" for p in result.probes)]
    if result.flags:
        lines += ["", "## Sanity flags: this result is unreliable", ""] + [f"- {f}" for f in result.flags]
    if extra.get("eps_rows"):
        eps_cols = sorted({r["eps"] for r in extra["eps_rows"]})
        table = [{"attack": a, **{format_eps(e): next(r["accuracy"] for r in extra["eps_rows"]
                                                     if r["attack"] == a and r["eps"] == e) for e in eps_cols}}
                 for a in dict.fromkeys(r["attack"] for r in extra["eps_rows"])]
        lines += ["", "## Accuracy vs eps", "", markdown_table(table, ["attack"] + [format_eps(e) for e in eps_cols]),
                  "", "Normalized AUC (trapezoid area / eps range; 1 = 100 % at every eps):", "",
                  markdown_table(extra["aucs"], ["attack", "auc", "eps_min", "eps_max", "points"]), "",
                  "![accuracy vs eps](eps_sweep.png)"]
    if extra.get("steps_rows"):
        lines += ["", "## Accuracy vs PGD steps", "", markdown_table(extra["steps_rows"], ["steps", "eps", "accuracy", "n"]),
                  "", "![accuracy vs steps](steps_sweep.png)"]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


__all__ = ["ATTACKS", "DEFAULT_ATTACKS", "EVAL_COLUMNS", "evaluate_checkpoint", "resolve_attacks", "result_rows",
           "run_attacks"]
