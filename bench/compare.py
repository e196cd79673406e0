"""Before/after: two code trees' pickup.py and heartbeat_load.py, measured side by side in one run.

    python bench/compare.py --before ../before --after . [--rounds 3] [--dsn DSN]
                            [--pickup-jobs 100] [--pickup-warmup 10] [--pickup-profile-jobs 0]
                            [--hb-jobs 8] [--hb-window 30] [--hb-dsn DSN] [--only pickup|heartbeat]
                            [--quiet-wait 0] [--python .venv/bin/python] [--json out.json]

A tree is a checkout of this repository (e.g. a `git worktree add ../before <commit>` of the code before a
change). Every measurement runs THAT tree's own script as a subprocess, with cwd=<tree> and
PYTHONPATH=<tree>/daemon:<tree>/bench prepended, so `import pgml_tuned` (in the script, in the daemon it starts
and in the daemon's job children, which inherit the environment) is that tree's code; the editable install in
the venv only comes after PYTHONPATH on sys.path. Before anything runs, each tree's `pgml_tuned.__file__` (and
the bench scripts' `common.__file__`) is checked to lie inside that tree, with exactly that environment.

The machine is noisy, so the two trees alternate: each round runs pickup (before, after), then heartbeat
(before, after), and every other round starts with the other tree (before, after, after, before, ...), so a
slow drift of the machine does not land on one side. Per metric it prints each round's value, the median over
the rounds for each tree, and after/before as the ratio of those medians and as the median of the per-round
ratios (a round's two runs ran next to each other). For each run it also records the machine's busy CPUs
(/proc/stat) and how many of them were the run's own processes (the script, its daemons and their job
children; not the database servers), so a run that other work disturbed shows; --quiet-wait S makes each run
first wait (at most S seconds) for the machine to be idle.

- pickup.py (NOTIFY → claimed of an idle daemon, ms; see its docstring): `--jobs --warmup --profile-jobs --dsn`.
  Both trees use the same server: --dsn, else the local PostgreSQL at DEFAULT_DSN if it answers, else the
  embedded server of the --before tree (`pgml_tuned.embedded.ensure(<before>/.pgml-bench)`).
- heartbeat_load.py (database statements and WAL per running job, per second): `--jobs --window`; it counts WAL
  server-wide, so by default (no --hb-dsn) every run starts its own PRIVATE embedded PostgreSQL.

It needs only the standard library itself; --python (default: the .venv
of this checkout, else this interpreter) runs the benchmarks and must have the trees' dependencies.
Duration with the defaults: ~3 minutes per tree per round on the 2-vCPU VM (pickup.py ~1.5 min with 100
jobs, heartbeat_load.py ~1.3 min with 30 s windows), so ~6 minutes a round and ~17 minutes for 3 rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
TAIL = 4000  # characters of a failed run's output printed and kept

# (key, label, extract from the script's JSON). Values are floats; None when the run lacks the figure.
Metric = tuple[str, str, Callable[[dict[str, Any]], float | None]]


def _get(*path: str) -> Callable[[dict[str, Any]], float | None]:
    def get(d: dict[str, Any]) -> float | None:
        x: Any = d
        for p in path:
            if not isinstance(x, dict) or p not in x:
                return None
            x = x[p]
        return float(x) if isinstance(x, int | float) else None

    return get


def _pickup_floor_gap(d: dict[str, Any]) -> float | None:
    """pickup p50 − (raw NOTIFY + 1 statement, async listener) p50: the daemon's part above the floor."""
    a, b = _get("stats", "pickup", "p50")(d), _get("stats", "raw_async_stmt", "p50")(d)
    return None if a is None or b is None else a - b


PICKUP_METRICS: list[Metric] = [
    *(
        (f"{key}.{p}", f"{label} {p} (ms)", _get("stats", key, p))
        for key, label in (
            ("pickup", "pgml-tuned pickup, commit → claimed"),
            ("raw_sync", "raw NOTIFY → sync listener"),
            ("raw_async", "raw NOTIFY → async listener"),
            ("raw_async_stmt", "raw NOTIFY + 1 statement (async)"),
            ("commit_tune", "COMMIT → ack, tune() txn"),
            ("commit_ref", "COMMIT → ack, reference txn"),
        )
        for p in ("p50", "p99")
    ),
    *(
        (f"pickup_after_ack.{p}", f"pickup minus its COMMIT duration {p} (ms)", _get("pickup_after_ack", p))
        for p in ("p50", "p99")
    ),
    ("pickup_minus_floor.p50", "pickup − (NOTIFY + 1 stmt) p50 (ms)", _pickup_floor_gap),
]
PROFILE_PHASES = ("daemon's part: listener has the notify → claimed", "total: commit sent → claimed")


def pickup_metrics(sample: dict[str, Any]) -> list[Metric]:
    """The fixed pickup figures, plus the traced daemons' (--pickup-profile-jobs) where a run has them."""
    out = list(PICKUP_METRICS)
    for variant, phases in sorted((sample.get("profile") or {}).items()):
        for phase in PROFILE_PHASES:
            if phase in phases:
                short = "daemon's part" if phase.startswith("daemon") else "total"
                out.append(
                    (
                        f"profile.{variant}.{short}.p50",
                        f"traced {variant}: {short} p50 (ms)",
                        _get("profile", variant, phase, "p50"),
                    )
                )
    return out


def _wal_per_renewal(d: dict[str, Any]) -> float | None:
    wal, ren = _get("per_job", "wal")(d), _get("per_job", "renewals")(d)
    return wal / ren if wal is not None and ren else None


HEARTBEAT_METRICS: list[Metric] = [
    ("per_job.xacts", "per running job: statements/s", _get("per_job", "xacts")),
    ("per_job.renewals", "per running job: lease renewals/s", _get("per_job", "renewals")),
    ("per_job.wal", "per running job: WAL bytes/s", _get("per_job", "wal")),
    ("per_job.upd", "per running job: pgml.jobs updates/s", _get("per_job", "upd")),
    ("wal_per_renewal", "WAL bytes per renewal", _wal_per_renewal),
    ("idle.xacts", "idle daemon: statements/s", _get("idle", "xacts")),
    ("idle.wal", "idle daemon: WAL bytes/s", _get("idle", "wal")),
    ("running.xacts", "all jobs running: statements/s", _get("running", "xacts")),
    ("running.wal", "all jobs running: WAL bytes/s", _get("running", "wal")),
]


# ---- the trees ----


def tree_env(tree: Path, dirs: list[str]) -> dict[str, str]:
    """os.environ with <tree>/<dir>... prepended to PYTHONPATH."""
    paths = [str(tree / d) for d in dirs]
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, *([old] if old else [])])}


def check_tree(python: str, tree: Path, dirs: list[str], scripts: list[str]) -> dict[str, Any]:
    """Fail loudly unless, with the environment its runs get, `pgml_tuned` and `common` import from `tree`."""
    for s in scripts:
        if not (tree / "bench" / s).is_file():
            sys.exit(f"error: {tree / 'bench' / s} does not exist")
    probe = "import json, pgml_tuned, common; print(json.dumps([pgml_tuned.__file__, common.__file__]))"
    r = subprocess.run([python, "-c", probe], cwd=tree, env=tree_env(tree, dirs), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: importing pgml_tuned/common for tree {tree} failed:\n{r.stderr[-TAIL:]}")
    files = [Path(f).resolve() for f in json.loads(r.stdout.strip().splitlines()[-1])]
    for f in files:
        if not f.is_relative_to(tree):
            sys.exit(
                f"error: with PYTHONPATH for {tree}, {f.stem if f.stem != '__init__' else f.parent.name} "
                f"imports from {f}, outside that tree (wrong tree; is the package somewhere else now? "
                "see --pythonpath-dirs)"
            )
    git = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(tree), "log", "-1", "--format=%H %s"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(tree), "status", "--porcelain"], capture_output=True, text=True
    )
    return {
        "tree": str(tree),
        "pgml_tuned": str(files[0]),
        "common": str(files[1]),
        "commit": git.stdout.strip() or None,
        "changed_files": len(dirty.stdout.splitlines()),
    }


def pick_python(arg: str | None) -> str:
    if arg:
        return arg
    venv = HERE.parent / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def dsn_works(python: str, dsn: str) -> bool:
    code = "import sys, psycopg; psycopg.connect(sys.argv[1], connect_timeout=5).close()"
    try:
        r = subprocess.run([python, "-c", code, dsn], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def embedded_dsn(python: str, tree: Path, dirs: list[str]) -> str:
    code = (
        "import sys; from pathlib import Path; from pgml_tuned import embedded; "
        "print(embedded.ensure(Path(sys.argv[1]) / '.pgml-bench'))"
    )
    r = subprocess.run(
        [python, "-c", code, str(tree)], cwd=tree, env=tree_env(tree, dirs), capture_output=True, text=True
    )
    if r.returncode != 0:
        sys.exit(f"error: could not start the embedded PostgreSQL of {tree}:\n{r.stderr[-TAIL:]}")
    return r.stdout.strip().splitlines()[-1]


# ---- one run ----


def busy_cpu_seconds() -> float:
    """CPU-seconds all CPUs have been busy since boot (/proc/stat: all but idle and iowait); 0 if unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU-seconds of this process's waited-for descendants (each run's whole process tree, once it exited)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(max_wait: float, threshold: float = 0.3, window: float = 2.0) -> None:
    """Wait (at most max_wait s) until fewer than `threshold` CPUs were busy over the last `window` s."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        b0 = busy_cpu_seconds()
        time.sleep(window)
        if (busy_cpu_seconds() - b0) / window < threshold:
            return


def run_one(python: str, tree: Path, dirs: list[str], script: str, args: list[str], timeout: float) -> dict[str, Any]:
    """`<python> <tree>/bench/<script> <args> --json <tmp>` in `tree`; its JSON, wall time, busy CPUs."""
    with tempfile.TemporaryDirectory(prefix="pgml-compare-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [python, str(tree / "bench" / script), *args, "--json", str(out)]
        t0, b0, c0 = time.monotonic(), busy_cpu_seconds(), own_cpu_seconds()
        try:
            r = subprocess.run(
                cmd,
                cwd=tree,
                env=tree_env(tree, dirs),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
            rc, log = r.returncode, r.stdout
        except subprocess.TimeoutExpired as e:
            rc = -1
            log = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
            log += f"\n[compare.py: timed out after {timeout:.0f} s]"
        wall = time.monotonic() - t0
        busy = (busy_cpu_seconds() - b0) / wall if wall > 0 else 0.0
        own = (own_cpu_seconds() - c0) / wall if wall > 0 else 0.0
        result: dict[str, Any] | None = None
        if rc == 0:
            try:
                result = json.loads(out.read_text())
            except (OSError, ValueError) as e:
                rc, log = -2, log + f"\n[compare.py: no JSON result: {e}]"
    return {
        "cmd": cmd,
        "rc": rc,
        "wall_s": round(wall, 1),
        "busy_cores": round(busy, 2),
        "own_cores": round(own, 2),
        "result": result,
        "log": log if rc == 0 else log[-TAIL:],
    }


# ---- report ----


def median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def num(x: float | None) -> str:
    if x is None:
        return "-"
    ax = abs(x)
    return f"{x:.0f}" if ax >= 1000 else f"{x:.1f}" if ax >= 100 else f"{x:.2f}" if ax >= 10 else f"{x:.3f}"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None unless both are positive (a ratio of differences that can be ≤ 0 means nothing)."""
    return a / b if a is not None and b is not None and a > 0 and b > 0 else None


def diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def summarize(
    bench: str, runs: list[dict[str, Any]], metrics_of: Callable[[dict[str, Any]], list[Metric]]
) -> dict[str, Any]:
    """Per metric: each round's before/after value, their medians, ratio of medians, median of round ratios."""
    rounds = sorted({r["round"] for r in runs})
    by = {(r["round"], r["side"]): r.get("result") for r in runs}
    metrics: dict[str, Metric] = {}
    for r in runs:
        if r.get("result"):
            for m in metrics_of(r["result"]):
                metrics.setdefault(m[0], m)
    table: dict[str, Any] = {}
    for key, label, get in metrics.values():
        vals = {
            side: [get(by[(n, side)]) if by.get((n, side)) else None for n in rounds] for side in ("before", "after")
        }
        med_b, med_a = median(vals["before"]), median(vals["after"])
        paired = [ratio(a, b) for a, b in zip(vals["after"], vals["before"], strict=True)]
        table[key] = {
            "label": label,
            "before": vals["before"],
            "after": vals["after"],
            "median_before": med_b,
            "median_after": med_a,
            "ratio": ratio(med_a, med_b),
            "median_round_ratio": median(paired),
            "difference": diff(med_a, med_b),
        }
    return {"bench": bench, "rounds": rounds, "metrics": table}


def print_table(title: str, summary: dict[str, Any]) -> None:
    print(
        f"\n{title}\n  medians over {len(summary['rounds'])} round(s); after−before: difference of the medians; "
        "after/before: ratio of the medians [median of the per-round ratios]"
    )
    print(
        f"  {'metric':<44} {'before':>9} {'after':>9} {'after−before':>12} {'after/before':>18}"
        "   rounds: before | after"
    )
    for m in summary["metrics"].values():
        r, rr, d = m["ratio"], m["median_round_ratio"], m["difference"]
        rs = f"{r:.3f}x" if r is not None else "-"
        rs += f" [{rr:.3f}x]" if rr is not None else ""
        ds = "-" if d is None else ("+" if d >= 0 else "") + num(d)
        per = " ".join(num(x) for x in m["before"]) + " | " + " ".join(num(x) for x in m["after"])
        print(f"  {m['label']:<44} {num(m['median_before']):>9} {num(m['median_after']):>9} {ds:>12} {rs:>18}   {per}")


# ---- main ----


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="the tree of the code before (a checkout)")
    ap.add_argument("--after", type=Path, required=True, help="the tree of the code after (a checkout)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every benchmark once per tree")
    ap.add_argument("--only", choices=["pickup", "heartbeat"], help="run just this benchmark")
    ap.add_argument("--python", help="interpreter for the benchmarks (default: this checkout's .venv/bin/python)")
    ap.add_argument(
        "--pythonpath-dirs",
        default="daemon:bench",
        help="tree-relative folders prepended to PYTHONPATH, ':'-separated (default daemon:bench)",
    )
    ap.add_argument(
        "--dsn",
        help=f"server for pickup.py, both trees (default: '{DEFAULT_DSN}' if it answers, "
        "else the --before tree's embedded .pgml-bench server)",
    )
    ap.add_argument("--pickup-jobs", type=int, default=100, help="pickup.py --jobs (default 100)")
    ap.add_argument("--pickup-warmup", type=int, default=10, help="pickup.py --warmup (default 10)")
    ap.add_argument(
        "--pickup-profile-jobs",
        type=int,
        default=0,
        help="pickup.py --profile-jobs: traced daemons (bench/traced_daemon.py of each tree, which "
        "patches daemon internals) for the phase split; default 0 (skipped)",
    )
    ap.add_argument("--hb-jobs", type=int, default=8, help="heartbeat_load.py --jobs (default 8)")
    ap.add_argument("--hb-window", type=float, default=30, help="heartbeat_load.py --window, s (default 30)")
    ap.add_argument(
        "--hb-dsn",
        help="heartbeat_load.py --dsn: a server nothing else writes to (default: a "
        "private embedded one per run; WAL is counted server-wide)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        help="before each run, wait at most this many s for the machine to be idle (<0.3 busy CPUs; default 0)",
    )
    ap.add_argument("--run-timeout", type=float, default=1800, help="seconds one benchmark run may take")
    ap.add_argument("--json", type=Path, help="also write everything (every run's figures) to this file")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    dirs = [d for d in args.pythonpath_dirs.split(":") if d]
    python = pick_python(args.python)
    benches = [b for b in ("pickup", "heartbeat") if args.only in (None, b)]
    scripts = {"pickup": "pickup.py", "heartbeat": "heartbeat_load.py"}

    print(f"python: {python}")
    info = {side: check_tree(python, tree, dirs, [scripts[b] for b in benches]) for side, tree in trees.items()}
    for side, i in info.items():
        print(
            f"{side:>6}: {i['tree']}  ({(i['commit'] or 'not a git checkout')[:72]}; "
            f"{i['changed_files']} changed files)\n        pgml_tuned from {i['pgml_tuned']}"
        )
    if trees["before"] == trees["after"]:
        print("NOTE: --before and --after are the same tree (an A-vs-A run: the ratios show the noise)")

    bench_args: dict[str, list[str]] = {}
    if "pickup" in benches:
        dsn = args.dsn
        if not dsn:
            if dsn_works(python, DEFAULT_DSN):
                dsn = DEFAULT_DSN
            else:
                print(f"({DEFAULT_DSN!r} does not answer: using the embedded server of {trees['before']})")
                dsn = embedded_dsn(python, trees["before"], dirs)
        elif not dsn_works(python, dsn):
            sys.exit(f"error: cannot connect to --dsn {dsn!r}")
        print(f"pickup: server {dsn!r} (both trees)")
        bench_args["pickup"] = [
            "--dsn",
            dsn,
            "--jobs",
            str(args.pickup_jobs),
            "--warmup",
            str(args.pickup_warmup),
            "--profile-jobs",
            str(args.pickup_profile_jobs),
        ]
    if "heartbeat" in benches:
        print(f"heartbeat: {'--hb-dsn ' + repr(args.hb_dsn) if args.hb_dsn else 'a private embedded server per run'}")
        bench_args["heartbeat"] = [
            "--jobs",
            str(args.hb_jobs),
            "--window",
            str(args.hb_window),
            *(["--dsn", args.hb_dsn] if args.hb_dsn else []),
        ]

    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in benches}
    failed = 0
    for n in range(1, args.rounds + 1):
        order = ["before", "after"] if n % 2 else ["after", "before"]
        for b in benches:
            for side in order:
                if args.quiet_wait > 0:
                    wait_quiet(args.quiet_wait)
                print(f"round {n}/{args.rounds} {b:<9} {side:<6} ...", end=" ", flush=True)
                r = run_one(python, trees[side], dirs, scripts[b], bench_args[b], args.run_timeout)
                r |= {"round": n, "side": side}
                runs[b].append(r)
                if r["rc"] == 0:
                    print(
                        f"{r['wall_s']:6.1f} s  (machine busy {r['busy_cores']:.2f} cores, "
                        f"this run's processes {r['own_cores']:.2f})",
                        flush=True,
                    )
                else:
                    failed += 1
                    print(f"FAILED (rc {r['rc']}, {r['wall_s']:.1f} s); last output:\n{r['log'][-TAIL:]}", flush=True)
    total = time.monotonic() - started

    summaries: dict[str, Any] = {}
    if "pickup" in benches:
        summaries["pickup"] = summarize("pickup", runs["pickup"], pickup_metrics)
        print_table(f"pickup.py: NOTIFY → claimed, {args.pickup_jobs} jobs per run (milliseconds)", summaries["pickup"])
    if "heartbeat" in benches:
        summaries["heartbeat"] = summarize("heartbeat", runs["heartbeat"], lambda _: HEARTBEAT_METRICS)
        print_table(
            f"heartbeat_load.py: {args.hb_jobs} running jobs, {args.hb_window:.0f} s windows (per second)",
            summaries["heartbeat"],
        )
    print(
        f"\nbusy CPUs during each run, whole machine / this run's processes (not the database servers; "
        f"this machine has {os.cpu_count()}):"
    )
    for b in benches:
        for side in ("before", "after"):
            vals = "  ".join(f"{r['busy_cores']:.2f}/{r['own_cores']:.2f}" for r in runs[b] if r["side"] == side)
            print(f"  {b:<9} {side:<6} {vals}")
    print(
        f"\n{sum(len(v) for v in runs.values())} runs in {total / 60:.1f} min"
        + (f", {failed} FAILED (their values are '-')" if failed else "")
    )

    if args.json:
        doc = {
            "at": dt.datetime.now().isoformat(timespec="seconds"),
            "python": python,
            "trees": info,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "bench_args": bench_args,
            "seconds": round(total, 1),
            "summary": summaries,
            "runs": runs,
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"written: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
