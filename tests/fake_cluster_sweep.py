"""Run `raydefense sweep afs` on a fake 2-node Ray cluster and kill the worker node mid-sweep.

Run by tests/test_cluster.py in a subprocess (a ``ray.cluster_utils.Cluster`` needs a Ray of its
own, apart from the test session's). The head and the worker node have 1 CPU each, so the two
1-CPU trials must land on different nodes. Once the trial on the worker node has reported an
epoch (and so has a checkpoint), the worker node is removed; the sweep command must still finish
every trial, the lost one retried from its checkpoint on the head. Prints one JSON line.

    python tests/fake_cluster_sweep.py OUT_DIR [--keep-worker] [--max-failures N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import read_results  # tests/ is on sys.path: this script runs from it


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--keep-worker", action="store_true")
    parser.add_argument("--max-failures", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args()

    from ray.cluster_utils import Cluster

    system = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    os.environ["OMP_NUM_THREADS"] = "1"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "_system_config": system})
    report: dict = {"removed_at_epoch": None}
    proc = None
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        report["head"], report["worker"] = cluster.head_node.node_id, worker.node_id
        cmd = [sys.executable, "-m", "raydefense", "sweep", "afs", "--budgets", "0,3", "--epochs", str(args.epochs),
               "--attack-steps", "2", "--val-attack-steps", "2", "--out", str(args.out),
               "--address", cluster.address, "--max-failures", str(args.max_failures)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + args.timeout
        while not args.keep_worker and proc.poll() is None and time.monotonic() < deadline:
            lines = [r for rs in read_results(args.out / "tune").values() for r in rs]
            on_worker = [r for r in lines if r.get("node_id") == worker.node_id and not r.get("done_training")]
            if on_worker:
                cluster.remove_node(worker, allow_graceful=False)
                report["removed_at_epoch"] = on_worker[-1]["epoch"]
                break
            time.sleep(0.2)
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            report["timed_out"] = True
        report["returncode"] = proc.returncode
        report["output_tail"] = output[-3000:]
        report["trials"] = {name: [{k: r.get(k) for k in ("epoch", "node_id", "done_training", "resumed_from_epoch",
                                                          "epochs_run")} for r in rs]
                            for name, rs in read_results(args.out / "tune").items()}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
