"""Benchmark: the per-hop latency the mesh adds over raw aiokafka, across paced rates.

    .venv/bin/python bench/hops.py [--rates 25,50,100,200] [--brokers embedded,apache]
                                   [--modes one,processes] [--repeat 2] [--seconds 30]
    .venv/bin/python bench/hops.py --summarise bench/results/chain-*.json

One paced run of ``bench/chain.py --runs raw,mesh`` says little on this machine: the
same code's hop differs by several milliseconds from one run to the next (on the
embedded broker a fetch wakes every 100 ms whatever arrives, and where a record lands
in that cycle decides most of its hop). This runs chain.py for every rate, broker and
mode (``one``: the stages in one process; ``processes``: each stage in a process of its
own, as deployed), ``--repeat`` times, each in a fresh process with a fresh broker
(Apache Kafka warmed by an unreported raw run of 1,000 events), injecting for
``--seconds`` (3,000 events at most), and prints, per rate, broker and mode:

* the milliseconds a mesh hop adds over raw's at p50 in each run, and their median;
* how busy the machine was (client and broker CPU over the run's time, in cores, the
  median of the mesh's runs): a rate is far below capacity only when this is low.

Every chain run checks its own counts (all N at the sink, duplicates counted); a run
that fails stops this one (exit 1). ``--summarise`` prints the same table from chain.py
results already written, without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="25,50,100,200", help="events/s, comma-separated")
    parser.add_argument("--brokers", default="embedded,apache")
    parser.add_argument("--modes", default="one,processes",
                        help="one: the stages in one process; processes: a process each")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each combination")
    parser.add_argument("--seconds", type=int, default=30, help="seconds of injection per run")
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="JSON",
                        help="print the table of these chain.py results; run nothing")
    args = parser.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates takes numbers, got {args.rates!r}")
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if (not args.rates or min(args.rates) <= 0 or args.repeat < 1 or args.seconds < 1
            or not set(args.brokers) <= {"embedded", "apache"}
            or not set(args.modes) <= {"one", "processes"}):
        parser.error("--rates > 0, --repeat and --seconds >= 1, --brokers of embedded and "
                     "apache, --modes of one and processes")
    return args


def run_chain(rate: float, broker: str, mode: str, seconds: int) -> Path:
    """One chain.py run (raw, then mesh); the path of its results."""
    events = min(3000, max(1, round(rate * seconds)))
    command = [sys.executable, str(ROOT / "bench" / "chain.py"), "--broker", broker,
               "--events", str(events), "--rate", format(rate, "g"), "--runs", "raw,mesh"]
    if broker == "apache":
        command += ["--warmup", "1000"]
    if mode == "processes":
        command.append("--processes")
    shown = ["bench/chain.py", *command[2:]]
    print(f"$ {' '.join(shown)}  (load average {os.getloadavg()[0]:.2f})", flush=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          check=False)
    found = [line.split("results:", 1)[1].strip() for line in done.stdout.splitlines()
             if line.startswith("results:")]
    if done.returncode != 0 or not found:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"chain.py failed (exit {done.returncode}): {' '.join(command)}")
    return ROOT / found[0]


def row_of(path: Path) -> tuple[tuple[float, str, str], dict[str, float]] | None:
    """(rate, broker, mode) and the figures of one paced raw,mesh result; None for a
    result that is not one."""
    document = json.loads(path.read_text())
    params, runs = document["params"], document["runs"]
    if not params.get("rate") or "raw" not in runs or "mesh" not in runs:
        return None
    raw, mesh = runs["raw"], runs["mesh"]
    if not raw.get("hop_ms") or not mesh.get("hop_ms"):
        return None

    def busy(run: dict[str, Any]) -> float:
        extra = run["extra"]
        cpu = (extra.get("client_cpu_s") or 0.0) + (extra.get("broker_cpu_s") or 0.0)
        return float(cpu / run["elapsed_s"])

    key = (float(params["rate"]), params["broker"],
           "processes" if params.get("processes") else "one")
    return key, {"added": mesh["hop_ms"]["hop"]["p50"] - raw["hop_ms"]["hop"]["p50"],
                 "raw_hop": raw["hop_ms"]["hop"]["p50"], "busy_raw": busy(raw),
                 "busy_mesh": busy(mesh)}


def summarise(paths: list[Path]) -> None:
    rows: dict[tuple[float, str, str], list[dict[str, float]]] = {}
    for path in paths:
        row = row_of(path)
        if row is not None:
            rows.setdefault(row[0], []).append(row[1])
    if not rows:
        raise SystemExit("no paced raw,mesh chain results among these files")
    print(f"\n{'broker':<9} {'stages':<10} {'rate/s':>6} {'raw hop p50':>12} "
          f"{'busy raw':>9} {'busy mesh':>10}  mesh hop over raw at p50 (ms): runs; median")
    for (rate, broker, mode), found in sorted(rows.items(), key=lambda kv: (
            kv[0][1], kv[0][2], kv[0][0])):
        added = [f["added"] for f in found]
        print(f"{broker:<9} {mode:<10} {rate:>6g} "
              f"{statistics.median(f['raw_hop'] for f in found):>9.0f} ms "
              f"{statistics.median(f['busy_raw'] for f in found):>9.2f} "
              f"{statistics.median(f['busy_mesh'] for f in found):>10.2f}  "
              f"{', '.join(f'{a:+.0f}' for a in added)}; {statistics.median(added):+.1f}")
    print(f"\n(busy: cores, of {os.cpu_count()}, kept busy by the client and the broker over "
          "the run; the medians are over the runs listed)")


def main() -> int:
    args = parse_args()
    if args.summarise:
        summarise(args.summarise)
        return 0
    written = [run_chain(rate, broker, mode, args.seconds)
               for _ in range(args.repeat) for rate in args.rates
               for broker in args.brokers for mode in args.modes]
    summarise(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
