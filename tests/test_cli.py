"""The CLI end to end on tiny runs, and one clear line + exit 2 for every bad input."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from helpers import interrupt_at, run_cli, unbuffered_env

from raydefense.cli import INTERRUPTED



def test_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "pgdat"
    assert run_cli("train", "pgd-at", "--epochs", "1", "--attack-steps", "2", "--val-attack-steps", "2",
                   "--eps", "3/16", "--out", out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["eps"] == 3 / 16 and cfg["finished"]
    assert run_cli("evaluate", out, "--attacks", "fgsm,pgd10,pgd20", "--n", "60") == 0
    rows = pq.read_table(out / "eval.parquet").to_pylist()
    acc = {r["attack"]: r["accuracy"] for r in rows}
    assert list(acc) == ["clean", "fgsm", "pgd10", "pgd20", "worst-case"]
    assert all(r["n"] == 60 for r in rows) and {"attack", "eps", "accuracy", "n"} <= set(rows[0])
    assert acc["worst-case"] <= min(acc[a] for a in ("clean", "fgsm", "pgd10", "pgd20"))
    report = (out / "report.md").read_text()
    assert "worst-case" in report and "torch" in report


def test_train_accepts_method_options_and_config_file(tmp_path):
    out = tmp_path / "trades"
    conf = tmp_path / "best.json"
    conf.write_text(json.dumps({"epochs": 1, "attack_steps": 1, "val_attack_steps": 1, "options": {"beta": 2.0}}))
    assert run_cli("train", "trades", "--config", conf, "--set", "beta=3", "--out", out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["options"] == {"beta": "3"} or cfg["train"]["options"]["beta"] in (3, 3.0, "3")
    assert cfg["train"]["epochs"] == 1


@pytest.mark.parametrize("args,message", [
    (["train", "nope"], "unknown method 'nope'"),
    (["train", "pgd-at", "--dataset", "imagenet1k"], "unknown dataset 'imagenet1k'"),
    (["train", "pgd-at", "--eps", "-0.1"], "eps must be >= 0"),
    (["train", "pgd-at", "--eps", "abc"], "eps must be float"),
    (["train", "trades", "--set", "gamma=1"], "unknown option 'gamma'"),
    (["train", "pgd-at", "--config", "/nonexistent.json"], "does not exist"),
    (["evaluate", "/nonexistent/ckpt"], "does not exist"),
    (["evaluate", "{ckpt}", "--attacks", "pgd7"], "unknown attack 'pgd7'"),
    (["sweep", "afs", "--budgets", "9..0"], "runs backwards"),
    (["sweep", "afs", "--budgets", "0..x"], "cannot read budget"),
    (["sweep", "afs", "--cpus-per-trial", "0"], "must be > 0"),
    (["sweep", "afs", "--gpus-per-trial", "1.5"], "must be whole"),
    (["sweep", "afs", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["sweep", "afs", "--address", "127.0.0.1:1"], "no Ray cluster at 127.0.0.1:1"),
    (["stack", "afs", "/nonexistent/sweep"], "holds no sweep.parquet"),
    (["stack", "afs", "/nonexistent/sweep", "--alpha", "2"], "must lie in [0, 1]"),
    (["evaluate", "{ckpt}", "--split", "train"], "--split must be test or val, got 'train'"),
    (["cluster", "check", "{ckpt}"], "is a directory, not a YAML file"),
    (["tune", "trades", "--space", "{ckpt}"], "is a directory, not a YAML file"),
    (["train", "pgd-at", "--no-such-option"], "No such option: --no-such-option"),  # typer's own usage errors
    (["evaluate"], "Missing argument"),
    (["no-such-command"], "No such command"),
])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, capsys, natural_ckpt, args, message):
    args = [a.replace("{ckpt}", str(natural_ckpt)) for a in args]
    assert run_cli(*args, *(["--out", tmp_path / "o"] if args[0] in ("train", "sweep") else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o" / "config.json").exists()


@pytest.mark.parametrize("command", [["tune", "trades"], ["sweep", "afs"]])
def test_unknown_storage_scheme_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch, command):
    import raydefense.distributed.cluster as cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cluster, "ray_cluster", no_ray)
    assert run_cli(*command, "--storage", "ftp://x", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --storage 'ftp://x': unknown scheme ftp://") and "\n" not in err, err


def test_ctrl_c_says_finished_work_is_kept_and_the_same_command_resumes(tmp_path):
    """Through the real entry point: Ctrl-C after the first epoch exits 130 with the promised line; the
    same command then finishes the run without training that epoch again."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "raydefense", "train", "natural", "--epochs", "2", "--val-attack-steps", "1",
           "--out", str(out)]
    code, output = interrupt_at(cmd, "epoch", tmp_path / "hold", stop_timeout=60)
    assert code == 130, output[-3000:]
    assert INTERRUPTED in output.splitlines() and "Traceback" not in output, output[-3000:]
    assert not json.loads((out / "config.json").read_text())["finished"]  # nothing looks complete

    again = subprocess.run(cmd, capture_output=True, text=True, env=unbuffered_env(), timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["finished"]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_corrupt_config_json_via_the_real_entry_point(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    (tmp_path / "model.pt").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "raydefense", "evaluate", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # exactly one line
    assert "corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "eval.parquet").exists()


def test_help_and_usage_errors_load_neither_torch_nor_ray_tune():
    # Registering every command (what --help and a usage error need) stays light: torch and Ray
    # Tune load only inside the commands that run something (about 5 s saved per --help).
    code = ("import sys\n"
            "from raydefense.cli import main\n"
            "for argv in (['--help'], ['evaluate', '--help'], ['sweep', 'afs', '--budgets', 'x']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = sorted(m for m in ('torch', 'ray.tune', 'sklearn') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:] + proc.stderr[-2000:]


def test_messages_with_brackets_print_literally(capsys):
    # rich reads "[default]" as markup: the dashboard hint "pip install 'ray[default]...'" lost it
    from raydefense.cli.ui import print_ray_info

    print_ray_info({"dashboard_note": "the Ray dashboard needs ray[default] (x); pip install 'ray[default]==2.60.*'"},
                   "/tmp/runs[1]")
    out = " ".join(capsys.readouterr().out.split())  # undo the console's line wrapping
    assert "pip install 'ray[default]==2.60.*'" in out and "/tmp/runs[1]" in out
