"""raydefense vs a reference loop written the common way (torchattacks + a plain training step).

    python benchmarks/run.py --quick        # a few minutes on a loaded 2-core CPU
    python benchmarks/run.py                # more repetitions; the sweep at 2 epochs, extrapolated
    python benchmarks/run.py --full         # also runs `raydefense sweep afs --budgets 0..9` once

Every comparison is measured interleaved (A, B, A, B, ... with the order rotated each repetition)
on the same model, data and settings; each variant's figure is the median over repetitions and
each ratio is the ratio of medians (raydefense / reference, higher is better). The load average
is printed with the figures: on a shared machine it says how much to trust them. Not collected
by pytest (pyproject's testpaths is ["tests"]). The output ends with ``ratio <what> <value>`` lines.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from raydefense.attacks import pgd_ce
from raydefense.attacks.shards import cpu_attack_shards, cpu_threads_as_shards
from raydefense.config import TrainConfig
from raydefense.data import load_splits
from raydefense.fast import autocast, cpu_has_native_bf16, prepare_modules, to_memory_format
from raydefense.methods import MethodContext, build_method
from raydefense.train import fit

CPU = torch.device("cpu")


def loadavg() -> str:
    try:
        return "load average %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f" {f}" in text)


def interleaved(fns: dict[str, Callable[[], int]], reps: int) -> dict[str, list[float]]:
    """Run each fn once per repetition (rotating the order) and collect items/second."""
    names = list(fns)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            tic = time.perf_counter()
            items = fns[name]()
            rates[name].append(items / (time.perf_counter() - tic))
    return rates


def report(title: str, rates: dict[str, list[float]], unit: str, reference: str) -> dict[str, float]:
    med = {n: statistics.median(v) for n, v in rates.items()}
    print(f"\n## {title}  ({loadavg()})")
    print(f"{'variant':<40}{'median ' + unit:>18}{'min':>10}{'max':>10}{'  vs ' + reference:>30}")
    for n, v in rates.items():
        print(f"{n:<40}{med[n]:>18.1f}{min(v):>10.1f}{max(v):>10.1f}{med[n] / med[reference]:>30.2f}")
    return med


# -- training step -----------------------------------------------------------------------------
def train_cfg(threads: int = 1, **fast) -> TrainConfig:
    # eps warm-up off so both loops attack at the full standard eps (1/4 on digits) from step one
    return TrainConfig(method="pgd-at", dataset="digits", eps_warmup_epochs=0, attack_steps=10,
                       batch_size=128, threads=threads, device="cpu", **fast)


def raydefense_step(cfg: TrainConfig, splits, init_state: dict, batches: list) -> tuple[Callable[[], int], object]:
    """The pgd-at Method's train_step exactly as fit drives it (fast paths from cfg; on a CPU, attacks
    sharded over ``cfg.threads`` single-threaded workers, as ``fit`` does)."""
    ctx = MethodContext(cfg, splits.info, CPU, steps_per_epoch=len(batches),
                        generator=torch.Generator().manual_seed(0))
    method = build_method(ctx)
    method.model.load_state_dict(init_state)
    prepare_modules(method.modules().values(), cfg)
    method.optimizers = method.configure_optimizers()
    method.model.train()
    it = iter(range(10**9))

    def run(n_batches: int) -> int:
        images = 0
        torch.set_num_threads(cfg.threads)
        with cpu_threads_as_shards(cfg.threads):  # as fit runs on a CPU
            for _ in range(n_batches):
                xb, yb = batches[next(it) % len(batches)]
                with autocast(cfg, CPU):
                    method.train_step(to_memory_format(xb, cfg), yb)
                images += len(yb)
        return images

    return run, method


def reference_step(splits, init_state: dict, batches: list, eps: float, threads: int = 1):
    """The common way: torchattacks.PGD, then forward, CE, zero_grad, backward, step, with
    ``threads`` torch intra-op threads (torch's default is one per core)."""
    import torchattacks

    from raydefense.models import build_classifier, default_arch

    model = build_classifier(default_arch(splits.info), splits.info)
    model.load_state_dict(init_state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    atk = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=10, random_start=True)
    it = iter(range(10**9))

    def run(n_batches: int) -> int:
        images = 0
        torch.set_num_threads(threads)
        for _ in range(n_batches):
            xb, yb = batches[next(it) % len(batches)]
            model.train()
            x_adv = atk(xb, yb)
            loss = F.cross_entropy(model(x_adv), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            images += len(yb)
        return images

    return run, model


def flops_per_image(fn: Callable[[], int]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        images = fn()
    return counter.get_total_flops() / images


def matmul_ceiling(dtype: torch.dtype, n: int = 512, reps: int = 5, threads: int = 1) -> float:
    """GFLOP/s of n x n matmuls on ``threads`` threads (the thread count the training runs with)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    rates = []
    for _ in range(reps):
        k = 10
        tic = time.perf_counter()
        for _ in range(k):
            a @ b
        rates.append(2 * n**3 * k / (time.perf_counter() - tic) / 1e9)
    torch.set_num_threads(1)
    return statistics.median(rates)


def bench_stacked(splits, n_models: int, reps: int) -> float:
    """n_models PGD-AT models stepped one after another vs stacked with vmap (raydefense.stacked)."""
    from raydefense.models import build_classifier, default_arch
    from raydefense.stacked import StackedModels, stacked_pgd_at_step

    info = splits.info
    x, y = splits.train.tensors()
    xb, yb = x[:128], y[:128]
    eps = torch.tensor([info.standard_eps * (i + 1) / n_models for i in range(n_models)])
    models = [build_classifier(default_arch(info), info) for _ in range(n_models)]
    separate = [copy.deepcopy(m) for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in separate]
    stack = StackedModels(models)
    sopt = torch.optim.SGD(list(stack.params.values()), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def one_by_one() -> int:
        for m, o, e in zip(separate, opts, eps.tolist()):
            xa = pgd_ce(m, xb, yb, e, 10, e / 4)
            loss = F.cross_entropy(m(xa), yb)
            o.zero_grad()
            loss.backward()
            o.step()
        return n_models * len(yb)

    def stacked() -> int:
        stacked_pgd_at_step(stack, sopt, xb, yb, eps, 10, eps / 4)
        return n_models * len(yb)

    one_by_one(), stacked()
    rates = interleaved({"one model at a time": one_by_one, "stacked (vmap)": stacked}, reps)
    med = report(f"{n_models} budgets' PGD-10 training steps in one process, images/s ({reps} interleaved reps)",
                 rates, "img/s", "one model at a time")
    return med["stacked (vmap)"] / med["one model at a time"]


# -- sweep ---------------------------------------------------------------------------------------
def _tree_cpu(root: int) -> dict[int, float]:
    """utime+stime (s) of root and its descendants now, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(d)] = int(fields[1])
        cpu[int(d)] = (int(fields[11]) + int(fields[12])) / tick
    keep, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for c, pp in parents.items():
            if pp == p and c not in keep:
                keep.add(c)
                frontier.append(c)
    return {p: cpu[p] for p in keep if p in cpu}


def run_sweep(extra: list[str], keep: bool = False) -> dict:
    """Run ``raydefense sweep afs --budgets 0..9`` once; wall time, CPU, and (keep=True) each trial's
    Tune results, read before the sweep directory is deleted."""
    out = Path(tempfile.mkdtemp(prefix="raydefense-bench-sweep-"))
    cmd = [sys.executable, "-c", "import sys; from raydefense.cli import main; main(sys.argv[1:])", "sweep", "afs", "--budgets", "0..9", "--out", str(out / "afs"),
           "--fresh", *extra]
    print("\n$ raydefense " + " ".join(cmd[3:]) + f"  ({loadavg()})", flush=True)
    seen: dict[int, float] = {}
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        for pid, t in _tree_cpu(proc.pid).items():
            seen[pid] = max(seen.get(pid, 0.0), t)
        time.sleep(2)
    wall = time.perf_counter() - tic
    err = proc.stderr.read() if proc.stderr else ""
    trials = _trial_results(out / "afs" / "tune") if keep else []
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        print(f"sweep failed (exit {proc.returncode}): {err[-2000:]}")
        return {}
    cpu_s = sum(seen.values())
    return {"wall_s": wall, "trials_per_min": 10 / wall * 60, "cpu_s": cpu_s,
            "cpu_util": cpu_s / wall / (os.cpu_count() or 1), "trials": trials}


def _trial_results(tune_dir: Path) -> list[list[dict]]:
    """Each trial's result lines, in the order Tune created the trials (its trial index)."""
    trials = [[json.loads(line) for line in f.read_text().splitlines() if line.strip()]
              for f in tune_dir.glob("*/result.json")]
    return sorted((t for t in trials if t), key=lambda t: t[0]["trial_id"].rsplit("_", 1)[-1])


def makespan(durations: list[float], slots: int) -> float:
    """Wall time of trials started in order on the first free of ``slots`` slots (how Tune packs them)."""
    free = [0.0] * max(1, slots)
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


def extrapolate_trial(results: list[dict], epochs: int) -> float:
    """A trial's duration at ``epochs`` epochs from a short run: its measured total plus the missing
    epochs at the last epoch's time (the first epoch carries one-off warm-up)."""
    return results[-1]["time_total_s"] + (epochs - len(_epoch_lines(results))) * last_epoch_time(results)


def _epoch_lines(results: list[dict]) -> list[dict]:
    return [r for r in results if not r.get("done_training")]


def last_epoch_time(results: list[dict]) -> float:
    return _epoch_lines(results)[-1]["time_this_iter_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--full", action="store_true", help="also run the real 10-budget sweep once (Ray)")
    ap.add_argument("--compile", action="store_true",
                    help="add the torch.compile variants (compilation took minutes on the loaded 2-core CPU)")
    ap.add_argument("--only", choices=("train", "eval", "stacked", "sweep"), default=None,
                    help="run one section (train includes the FLOP/s figures)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5 quick, 9 else)")
    args = ap.parse_args()
    reps = args.reps or (5 if args.quick else 9)
    chunk = 2 if args.quick else 5  # batches of 128 per timed chunk
    torch.set_num_threads(1)
    torch.manual_seed(0)

    print(f"# raydefense benchmarks  torch {torch.__version__}  {cpu_model()}  {os.cpu_count()} cores  "
          f"flags: {cpu_flags()}  threads 1  {loadavg()}")
    splits = load_splits("digits")
    info = splits.info
    eps = info.standard_eps
    x, y = splits.train.tensors()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    batches = [(x[order[i:i + 128]], y[order[i:i + 128]]) for i in range(0, len(y) - 127, 128)]
    from raydefense.models import build_classifier, default_arch

    init_state = copy.deepcopy(build_classifier(default_arch(info), info).state_dict())
    print(f"digits train n={len(y)}  batch 128  PGD-10 eps={eps:g} step eps/4  model {default_arch(info)}")

    ratios: dict[str, float] = {}
    if args.only in (None, "stacked"):
        ratios["stacked_vmap_vs_one_at_a_time"] = bench_stacked(splits, 4 if args.quick else 10, reps)
    if args.only in (None, "train"):
        bench_train(args, splits, batches, init_state, eps, reps, chunk, ratios)
    if args.only in (None, "eval"):
        bench_eval(args, splits, eps, reps, ratios)
    if args.only in (None, "sweep"):
        sweep_section(args, splits, ratios)
    print()
    for what, value in ratios.items():
        print(f"ratio {what} {value:.3f}")


def bench_train(args, splits, batches, init_state, eps, reps, chunk, ratios) -> None:
    """PGD-10 training-step throughput (and achieved FLOP/s) against the torchattacks reference."""
    variants = {"plain": {}, "bf16": {"amp": "bf16"}, "channels_last": {"channels_last": True},
                "bf16+channels_last": {"amp": "bf16", "channels_last": True}}
    if args.compile:
        variants["compile"] = {"compile": True}
    train_fns: dict[str, Callable[[], int]] = {}
    ref_run, ref_model = reference_step(splits, init_state, batches, eps)
    train_fns["reference (torchattacks)"] = lambda: ref_run(chunk)
    for name, fast in variants.items():
        run, _ = raydefense_step(train_cfg(**fast), splits, init_state, batches)
        tic = time.perf_counter()
        run(2)  # warm-up; for compile this is the compilation (train + eval graphs)
        if name == "compile":
            print(f"torch.compile: first 2 training steps took {time.perf_counter() - tic:.1f} s "
                  f"(compilation, paid once per process)  ({loadavg()})")
        train_fns[f"raydefense {name}"] = (lambda r=run: r(chunk))
    ref_run(2)

    flops = flops_per_image(lambda: raydefense_step(train_cfg(), splits, init_state, batches)[0](1))
    # The reference runs the same model through the same PGD-10 step; FlopCounterMode cannot count it
    # (its module tracker breaks torchattacks' autograd.grad on a leaf), so the same count is used.
    ref_flops = flops
    rates = interleaved(train_fns, reps)
    med = report(f"PGD-10 adversarial training, images/s ({reps} interleaved reps x {chunk} batches)",
                 rates, "img/s", "reference (torchattacks)")
    ref_rate = med["reference (torchattacks)"]
    for name in variants:
        ratios[f"train_pgd10_{name}"] = med[f"raydefense {name}"] / ref_rate

    ceil32, ceil16 = matmul_ceiling(torch.float32), matmul_ceiling(torch.bfloat16)
    print(f"\nFLOPs per training image (FlopCounterMode over one raydefense PGD-10 training step): "
          f"{flops / 1e6:.2f} MFLOP")
    native_bf16 = cpu_has_native_bf16()
    print(f"matmul ceiling, 1 thread, 512x512: fp32 {ceil32:.1f} GFLOP/s, bf16 {ceil16:.1f} GFLOP/s"
          f"{'' if native_bf16 else ' (emulated: no native bf16 here, so bf16 runs are set against fp32)'}"
          f"  ({loadavg()})")
    for name in variants:
        achieved = flops * med[f"raydefense {name}"] / 1e9
        # Without native bf16 the emulated bf16 matmul is no hardware peak (convolutions can beat it).
        kind = "bf16" if "bf16" in name and native_bf16 else "fp32"
        ceil = ceil16 if kind == "bf16" else ceil32
        print(f"  raydefense {name:<20} {achieved:6.2f} GFLOP/s = {100 * achieved / ceil:5.1f} % of the {kind} ceiling")
    achieved = ref_flops * ref_rate / 1e9
    print(f"  reference                       {achieved:6.2f} GFLOP/s = {100 * achieved / ceil32:5.1f} % of the fp32 ceiling")
    bench_train_machine(splits, batches, init_state, eps, reps, chunk, flops, ratios)


def bench_train_machine(splits, batches, init_state, eps, reps, chunk, flops, ratios) -> None:
    """Both loops given every core, as each would run by default on this machine: the reference with
    torch's default intra-op threads (one per core), raydefense with threads = cores, i.e. its attacks
    sharded over single-threaded workers (raydefense.attacks.shards)."""
    cores = os.cpu_count() or 1
    if cores < 2:
        print("\n(one core: no whole-machine comparison)")
        return
    ref_run, _ = reference_step(splits, init_state, batches, eps, threads=cores)
    ref_name = f"reference ({cores} threads)"
    fns: dict[str, Callable[[], int]] = {ref_name: lambda: ref_run(chunk)}
    variants = {"plain": {}, "channels_last": {"channels_last": True}}
    for name, fast in variants.items():
        run, _ = raydefense_step(train_cfg(threads=cores, **fast), splits, init_state, batches)
        run(2)
        fns[f"raydefense {name} ({cores} shards)"] = (lambda r=run: r(chunk))
    ref_run(2)
    rates = interleaved(fns, reps)
    torch.set_num_threads(1)
    med = report(f"PGD-10 adversarial training on all {cores} cores, images/s ({reps} interleaved reps x {chunk} batches)",
                 rates, "img/s", ref_name)
    ceiling = matmul_ceiling(torch.float32, threads=cores)
    print(f"matmul ceiling, {cores} threads, 512x512: fp32 {ceiling:.1f} GFLOP/s  ({loadavg()})")
    for name in fns:
        achieved = flops * med[name] / 1e9
        print(f"  {name:<40} {achieved:6.2f} GFLOP/s = {100 * achieved / ceiling:5.1f} % of the fp32 ceiling")
    for name in variants:
        ratios[f"train_pgd10_{cores}cores_{name}"] = med[f"raydefense {name} ({cores} shards)"] / med[ref_name]



def robust_eval_model(splits, epochs: int) -> torch.nn.Module:
    """A briefly PGD-AT-trained model: evaluation speed only means something on a model that resists.

    On a model with no robustness every attack breaks every sample at once, which would flatter the
    early-exit attack; this one keeps a sizeable share of samples robust to the end."""
    from raydefense import load_model

    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        fit(TrainConfig(method="pgd-at", dataset="digits", epochs=epochs, eps_warmup_epochs=epochs // 2,
                        threads=1, device="cpu", val_attack_steps=2), tmp, splits=splits)
        print(f"\nevaluation model: pgd-at, {epochs} epochs on digits ({time.perf_counter() - tic:.0f} s)")
        return load_model(tmp).eval()


def bench_eval(args, splits, eps: float, reps: int, ratios: dict[str, float]) -> None:
    """PGD-20 on the test split: torchattacks vs raydefense's engine, plain and as `evaluate` runs it."""
    import torchattacks

    from raydefense.attacks import pgd_ce_until_fooled

    model = robust_eval_model(splits, 6 if args.quick else 12)
    tx, ty = splits.test.tensors()
    with torch.no_grad():
        print(f"clean test accuracy {(model(tx).argmax(1) == ty).float().mean():.3f}")
    ref_name = "reference (torchattacks)"
    atk = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=20, random_start=True)
    gen = torch.Generator().manual_seed(1)
    cores = os.cpu_count() or 1

    def on(threads: int, fn: Callable[[torch.nn.Module], torch.Tensor], shards: int = 1):
        """Run fn with ``threads`` torch threads and raydefense's attacks in ``shards`` batch shards."""
        def run(m: torch.nn.Module) -> torch.Tensor:
            torch.set_num_threads(threads)
            with cpu_attack_shards(shards):
                return fn(m)
        return run

    until_fooled = lambda m: pgd_ce_until_fooled(m, tx, ty, eps, 20, eps / 4, generator=gen)  # noqa: E731
    attacks: dict[str, Callable[[torch.nn.Module], torch.Tensor]] = {
        ref_name: on(1, lambda m: atk(tx, ty)),
        "raydefense plain": on(1, lambda m: pgd_ce(m, tx, ty, eps, 20, eps / 4, generator=gen)),
        "raydefense until_fooled": on(1, until_fooled),
    }
    machine_ref = f"reference ({cores} threads)"
    machine_ours = f"raydefense until_fooled ({cores} shards)"
    if cores > 1:  # both given the whole machine: torch's default threads vs raydefense's shards
        attacks[machine_ref] = on(cores, lambda m: atk(tx, ty))
        attacks[machine_ours] = on(cores, until_fooled, shards=cores)
    models = {name: model for name in attacks}
    if args.compile:
        cmodel = copy.deepcopy(model)
        cmodel.compile()
        attacks["raydefense compile"] = attacks["raydefense plain"]
        models["raydefense compile"] = cmodel
    eval_acc: dict[str, list[float]] = {name: [] for name in attacks}

    def timed(name: str) -> Callable[[], int]:
        def run() -> int:
            xa = attacks[name](models[name])
            with torch.no_grad():
                eval_acc[name].append(float((model(xa).argmax(1) == ty).float().mean()))
            return len(ty)
        return run

    eval_fns = {name: timed(name) for name in attacks}
    for fn in eval_fns.values():  # warm-up (compilation for the compile variant)
        fn()
    rates = interleaved(eval_fns, reps)
    torch.set_num_threads(1)
    med = report(f"PGD-20 evaluation, test n={len(ty)}, images/s ({reps} interleaved reps; "
                 f"the last two rows use all {cores} cores)", rates, "img/s", ref_name)
    for name, accs in eval_acc.items():
        print(f"  PGD-20 robust accuracy, {name}: median {100 * statistics.median(accs):.1f} % "
              f"(min {100 * min(accs):.1f}, max {100 * max(accs):.1f}, {len(accs)} random starts)")
    print("  (until_fooled is what `raydefense evaluate` runs: a sample leaves the batch at the first iterate "
          "that fools the model, so it can only be stronger)")
    for name in ("raydefense plain", "raydefense until_fooled", "raydefense compile"):
        if name in med:
            ratios["eval_pgd20_" + name.split()[1]] = med[name] / med[ref_name]
    if cores > 1:
        ratios[f"eval_pgd20_{cores}cores_until_fooled"] = med[machine_ours] / med[machine_ref]
        print(f"  all {cores} cores: {machine_ours} / {machine_ref} = {med[machine_ours] / med[machine_ref]:.2f}")


def sweep_section(args, splits, ratios) -> None:
    """The real sweep (--full); else the real sweep at 2 epochs per trial, extrapolated to the default
    epochs from its measured per-epoch times, its Ray start-up and teardown, and Tune's packing."""
    epochs = TrainConfig().epochs
    if args.full:
        res = run_sweep([])
        if res:
            print(f"sweep afs --budgets 0..9 on digits ({epochs} epochs): wall {res['wall_s']:.0f} s, "
                  f"{res['trials_per_min']:.2f} trials/min, process-tree CPU {res['cpu_s']:.0f} s = "
                  f"{100 * res['cpu_util']:.0f} % of {os.cpu_count()} cores (sampled every 2 s: a lower bound)  "
                  f"({loadavg()})")
            ratios["sweep_vs_2min_target"] = 120 / res["wall_s"]
        return
    short = 2
    res = run_sweep(["--epochs", str(short)], keep=True)
    if not res or len(res["trials"]) != 10:
        print("short sweep gave no usable trial results; no extrapolation")
        return
    slots = os.cpu_count() or 1  # --cpus-per-trial 1
    measured = [t[-1]["time_total_s"] for t in res["trials"]]
    overhead = res["wall_s"] - makespan(measured, slots)
    est = overhead + makespan([extrapolate_trial(t, epochs) for t in res["trials"]], slots)
    steady = statistics.median(last_epoch_time(t) for t in res["trials"][1:])  # trial 0 is budget 0
    print(f"sweep afs --budgets 0..9 --epochs {short}: wall {res['wall_s']:.0f} s, of which {overhead:.0f} s "
          f"outside the trials (Ray and Tune start, actors, gaps, table, teardown); a PGD-AT epoch "
          f"{steady:.2f} s (median, 2 trials at a time)  ({loadavg()})")
    print(f"EXTRAPOLATION to {epochs} epochs (the trials' measured totals plus the missing epochs, packed on "
          f"{slots} slots in budget order, plus the same overhead): ~{est:.0f} s, ~{10 / est * 60:.1f} trials/min; "
          f"--full runs it")
    ratios["sweep_vs_2min_target_extrapolated"] = 120 / est


if __name__ == "__main__":
    main()
