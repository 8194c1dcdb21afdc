"""Run every bad input of docs/cluster.md's table through the real CLI and print the table.

    PYTHONPATH=. python docs/bad_inputs.py > /tmp/bad_inputs.md

Each row: what was typed, the exit status, the seconds it took, and the exact stderr/stdout line.
Builds its own small checkpoints (a 1-epoch natural digits model and broken copies of it).
"""

from __future__ import annotations

import argparse
import http.server
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch


def make_checkpoints(root: Path) -> dict[str, Path]:
    from raydefense.config import TrainConfig
    from raydefense.train import fit

    good = root / "good"
    fit(TrainConfig(method="natural", epochs=1, val_attack_steps=1), good)
    out = {"good": good}
    for name in ("no_weights", "corrupt", "pickled", "bad_json"):
        out[name] = root / name
        shutil.copytree(good, out[name])
    (out["no_weights"] / "model.pt").unlink()
    (out["corrupt"] / "model.pt").write_bytes(b"\x00not a torch file" * 10)
    torch.save({"weights": argparse.Namespace(evil=True)}, out["pickled"] / "model.pt")
    (out["bad_json"] / "config.json").write_text("{not json")
    return out


def not_ray_server() -> int:
    """A local HTTP server: a port that answers TCP but is not a Ray cluster."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def run_cli(argv: list[str]) -> tuple[int, str]:
    """The console script's entry point (raydefense.cli.main), in this process: the machine this
    table was made on needs about a minute per fresh ``python -m raydefense`` start under load."""
    import contextlib
    import io

    from raydefense.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return code, err.getvalue().strip() or out.getvalue().strip()


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="raydefense-bad-"))
    ck = make_checkpoints(root)
    port = not_ray_server()
    (root / "broken.yaml").write_text("cluster_name: x\nprovider: {type: aws\n")
    (root / "negative.yaml").write_text(Path("cluster.yaml").read_text().replace("max_workers: 6", "max_workers: -1"))
    (root / "afile").write_text("x")
    sweep = ["sweep", "afs", "--epochs", "1", "--out", str(root / "s")]
    cases = [
        ("budget grammar", [*sweep, "--budgets", "9..0"]),
        ("budget not a number", [*sweep, "--budgets", "0,x"]),
        ("negative budget", [*sweep, "--budgets", "-1,2"]),
        ("seeds", [*sweep, "--seeds", "0.5"]),
        ("eps text", ["train", "pgd-at", "--eps", "eight"]),
        ("negative eps", ["train", "pgd-at", "--eps", "-8/255"]),
        ("eps unit", [*sweep, "--eps-unit", "1/0"]),
        ("epochs 0", ["train", "natural", "--epochs", "0"]),
        ("unknown dataset", ["train", "natural", "--dataset", "mnist2"]),
        ("unknown method", ["train", "pgd_at"]),
        ("unknown method option", ["train", "trades", "--set", "betta=6"]),
        ("method option type", ["train", "trades", "--set", "beta=high"]),
        ("config file missing", ["train", "natural", "--config", str(root / "nope.json")]),
        ("checkpoint dir missing", ["evaluate", str(root / "nope")]),
        ("not a checkpoint dir", ["evaluate", str(root)]),
        ("config.json corrupt", ["evaluate", str(ck["bad_json"])]),
        ("model.pt missing", ["evaluate", str(ck["no_weights"]), "--attacks", "clean"]),
        ("model.pt corrupt", ["evaluate", str(ck["corrupt"]), "--attacks", "clean"]),
        ("model.pt holds a pickled object", ["evaluate", str(ck["pickled"]), "--attacks", "clean"]),
        ("unknown attack", ["evaluate", str(ck["good"]), "--attacks", "pgd7"]),
        ("sweep dir for stack is not a sweep", ["stack", "afs", str(root)]),
        ("cluster address refused", [*sweep, "--budgets", "0,1", "--address", "127.0.0.1:1"]),
        ("address a proxy answers (10.255.255.1 here)", [*sweep, "--budgets", "0,1", "--address", "10.255.255.1:6379"]),
        ("cluster address unresolvable", [*sweep, "--budgets", "0,1", "--address", "no-such-head.invalid:6379"]),
        ("cluster address garbage", [*sweep, "--budgets", "0,1", "--address", "head-node"]),
        ("port that accepts TCP but is not Ray (a local HTTP server)", [*sweep, "--budgets", "0,1", "--address", f"127.0.0.1:{port}"]),
        ("ray:// without Ray Client", [*sweep, "--budgets", "0,1", "--address", "ray://127.0.0.1:10001"]),
        ("storage scheme", [*sweep, "--storage", "ftp://host/x"]),
        ("storage is a file", [*sweep, "--storage", str(root / "afile")]),
        ("out is a file", ["sweep", "afs", "--out", str(root / "afile")]),
        ("cpus per trial", [*sweep, "--cpus-per-trial", "0"]),
        ("gpus per trial", [*sweep, "--gpus-per-trial", "1.5"]),
        ("max failures", [*sweep, "--max-failures", "-2"]),
        ("workers per trial", [*sweep, "--workers-per-trial", "0"]),
        ("dashboard host", [*sweep, "--dashboard-host", "my laptop"]),
        ("cluster config missing", ["cluster", "check", str(root / "nope.yaml")]),
        ("cluster config not YAML", ["cluster", "check", str(root / "broken.yaml")]),
        ("cluster config invalid", ["cluster", "check", str(root / "negative.yaml")]),
    ]
    print("| input | command | exit | seconds | message |\n|---|---|---|---|---|")
    for what, argv in cases:
        tic = time.monotonic()
        rc, text = run_cli(argv)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        message = next((ln for ln in lines if ln.startswith(("error:", "Error", "Usage", "│"))), lines[-1] if lines else "")
        if message.startswith(("│", "Usage")):
            message = " ".join(ln.strip("│ ").strip() for ln in lines if ln.startswith("│"))
        shown = " ".join(a.replace(str(root), "$TMP") for a in argv)
        message = message.replace(str(root), "$TMP").replace("|", "\\|")
        print(f"| {what} | `raydefense {shown}` | {rc} | {time.monotonic() - tic:.1f} | {message} |", flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
