"""``raydefense train <method>``: one model, one checkpoint directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import typer

from raydefense.cli import app
from raydefense.cli.options import dataclass_options
from raydefense.config import TrainConfig, build_dataclass, parse_assignments
from raydefense.errors import UserError


def load_config_file(path: Path) -> dict:
    """A JSON file of TrainConfig fields (e.g. best.json written by ``raydefense tune``)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"config file {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "train" in data and "kind" in data:  # a checkpoint's config.json
        data = data["train"]
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a JSON object of options, not a {type(data).__name__}")
    if not isinstance(data.get("options", {}), dict):
        raise UserError(f"config file {path}: 'options' must be a JSON object of method options, "
                        f"not a {type(data['options']).__name__}")
    return data


def check_out_dir(out: Path) -> None:
    """``--out`` must be a directory, or creatable as one: checked before anything trains, and
    without creating it (bad input leaves nothing behind)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file, not a directory")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create --out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot create or write --out {out}: no write permission on {existing}")


def make_train_config(method: str, overrides: dict, assignments: list[str], config_file: Optional[Path],
                      preset: Optional[str] = None) -> TrainConfig:
    """Layers, lowest first: TrainConfig defaults, --preset, --config, explicit flags, --set."""
    from raydefense.methods import get_method_class
    from raydefense.presets import preset_values
    from raydefense.warm_start import absolute_init_from

    get_method_class(method)  # unknown method: clear error before anything else
    layer = preset_values(preset, method)
    base = load_config_file(config_file) if config_file else {}
    values = {**layer, **base, **overrides, "method": method}
    options = {**layer.get("options", {}), **base.get("options", {}), **parse_assignments(assignments)}
    values["options"] = options
    cfg = absolute_init_from(build_dataclass(TrainConfig, values, where="train"))
    cls = get_method_class(method)
    build_dataclass(cls.Options, options, where=f"{method} options")  # validate now, not mid-run
    return cfg


@app.command()
@dataclass_options(TrainConfig, exclude=("method",))
def train(
    method: str = typer.Argument(..., help="natural, pgd-at, trades, mart, or a defense of METHODS.md"),
    out: Optional[Path] = typer.Option(None, help="checkpoint directory [default: runs/<method>-<dataset>-s<seed>]"),
    set_: list[str] = typer.Option([], "--set", help="method option key=value (repeatable), e.g. --set beta=6"),
    config: Optional[Path] = typer.Option(None, help="JSON file of training options (e.g. a tune best.json)"),
    preset: Optional[str] = typer.Option(None, help="a paper's settings as defaults that flags override: "
                                         "rice2020-pgd-at, zhang2019-trades, afs-extractor, afs-code-extractor "
                                         "(docs/presets.md)"),
    fresh: bool = typer.Option(False, help="delete OUT first instead of resuming from it"),
    overrides: dict = None,
) -> None:
    """Train one model; re-running the same command resumes from its checkpoint."""
    from raydefense.cli.ui import RichFitProgress, console, make_progress
    from raydefense.report import rich_table
    from raydefense.train import fit

    cfg = make_train_config(method, overrides or {}, set_, config, preset)
    out = out or Path("runs") / f"{cfg.method}-{cfg.dataset}-s{cfg.seed}"
    if fresh and out.is_dir():
        shutil.rmtree(out)
    check_out_dir(out)
    with make_progress() as progress:
        result = fit(cfg, out, progress=RichFitProgress(progress))
    best = {k: v for k, v in result.best.items() if k.startswith("val_") or k == "epoch"}
    console.print(rich_table([best], list(best), title=f"{cfg.method}: best epoch (validation split)"))
    console.print(f"checkpoint: {result.checkpoint}")
