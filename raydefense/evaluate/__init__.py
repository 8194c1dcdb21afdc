"""``evaluate_checkpoint``: attack a checkpoint's full inference path on the test split and write
``eval.parquet`` (one row per attack: attack, eps, accuracy, n), ``eval_samples.parquet`` (which
samples each attack broke) and ``report.md``."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Callable

from raydefense.checkpoint import load_model, read_config
from raydefense.data import format_eps, load_splits
from raydefense.device import resolve_device
from raydefense.errors import UserError
from raydefense.evaluate.attacks import ATTACKS, DEFAULT_ATTACKS, EvalAttack, resolve_attacks
from raydefense.evaluate.runner import WORST, EvalResult, run_attacks
from raydefense.provenance import provenance
from raydefense.report import markdown_table, write_parquet

log = logging.getLogger(__name__)

EVAL_COLUMNS = ("attack", "eps", "eps_label", "accuracy", "n", "seconds")


def checkpoint_dataset(config: dict) -> tuple[str, str | None]:
    """The dataset a checkpoint was trained on (name, data_dir)."""
    try:
        name = config["dataset"]["name"]
    except (KeyError, TypeError):
        raise UserError("checkpoint config.json names no dataset") from None
    return name, config.get("train", {}).get("data_dir") or config.get("data_dir")


def result_rows(result: EvalResult) -> list[dict]:
    rows = [{"attack": r.attack, "eps": r.eps, "eps_label": format_eps(r.eps), "accuracy": r.accuracy,
             "n": result.n, "seconds": r.seconds} for r in result.results]
    eps = max((r.eps for r in result.results), default=0.0)
    rows.append({"attack": WORST, "eps": eps, "eps_label": format_eps(eps),
                 "accuracy": float(result.worst_case().float().mean()), "n": result.n,
                 "seconds": sum(r.seconds for r in result.results)})
    return rows


def evaluate_checkpoint(ckpt_dir: str | Path, attacks: str | list[str] = DEFAULT_ATTACKS, n: int | None = None,
                        eps: float | None = None, out: str | Path | None = None, split: str = "test",
                        batch_size: int = 256, seed: int = 0, device: str = "auto", data_dir: str | None = None,
                        on_attack: Callable[[str, int, int], None] | None = None) -> tuple[list[dict], EvalResult, Path]:
    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    chosen = resolve_attacks(attacks)
    dev = resolve_device(device)
    model = load_model(ckpt_dir, dev)
    name, stored_dir = checkpoint_dataset(config)
    splits = load_splits(name, data_dir or stored_dir)
    x, y = splits[split].tensors()
    if n is not None:
        if n < 1:
            raise UserError(f"--n must be >= 1, got {n}")
        x, y = x[:n], y[:n]
    eps = splits.info.standard_eps if eps is None else eps
    if eps < 0:
        raise UserError(f"eps must be >= 0, got {eps}")
    result = run_attacks(model, x.to(dev), y.to(dev), chosen, eps, batch_size, seed, on_attack)
    rows = result_rows(result)

    out_dir = Path(out) if out else ckpt_dir
    write_parquet([{"sample": i, "attack": r.attack, "correct": bool(c)} for r in result.results
                   for i, c in enumerate(r.correct.tolist())], out_dir / "eval_samples.parquet")
    write_parquet(rows, out_dir / "eval.parquet", metadata={"flags": result.flags, "provenance": provenance()})
    write_report(out_dir / "report.md", ckpt_dir, config, rows, result, chosen, split)
    return rows, result, out_dir


def write_report(path: Path, ckpt_dir: Path, config: dict, rows: list[dict], result: EvalResult,
                 attacks: list[EvalAttack], split: str) -> None:
    from raydefense.checkpoint import atomic_write_bytes

    prov = provenance()
    verdict = "**unreliable**: " + "; ".join(result.flags) if result.flags else "no sanity flag raised"
    lines = [
        f"# Evaluation of `{ckpt_dir}`", "",
        f"- model: {config.get('kind')} {config.get('train', {}).get('method', '')}, "
        f"dataset {config.get('dataset', {}).get('name')} ({split} split, n={result.n})",
        f"- sanity: {verdict}",
        f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- versions: {', '.join(f'{k} {v}' for k, v in prov.items())}", "",
        "Accuracy per attack; `worst-case` counts a sample as robust only if no attack broke it.", "",
        markdown_table(rows, EVAL_COLUMNS), "", "## Attacks", "",
    ]
    lines += [f"- `{a.name}`: {a.description or ''} {a.params}" for a in attacks]
    if result.flags:
        lines += ["", "## Sanity flags (result unreliable)", ""] + [f"- {f}" for f in result.flags]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


__all__ = ["ATTACKS", "DEFAULT_ATTACKS", "EVAL_COLUMNS", "evaluate_checkpoint", "result_rows", "run_attacks"]
