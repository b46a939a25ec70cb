"""Reads bench/mlp.py JSONs for scripts/gpu_session.sh.

    python bench/sweep_score.py RESULT.json [MORE.json ...]  # the overlap sweep's score (lower is better)
    python bench/sweep_score.py --table RESULT.json          # tpext, floor-ops, collectives, exposed per row
    python bench/sweep_score.py --ratio single-ops single RESULT.json  # one system against another per row

The score weighs the two fwd+bwd floor goals of issue 5 alike: the mean of tpext / floor-ops at
eager M=4096 and M=16384 fwd+bwd. Ratios to a floor measured interleaved in the same run, not
tpext's own times: under the GPUs' power cap the clocks, and with them every absolute time, drift
by several percent between runs (bench/NOTES.md, attempt 8). Several files (rounds of one setting)
give the median of their scores. Prints nothing, and exits 1, when a row is missing from any file
(a run that failed or was cut short).
"""
import argparse
import json
import statistics
import sys


def eager_fwdbwd(rows, system, m):
    for r in rows:
        if r["system"] == system and r["M"] == m and r["mode"] == "fwdbwd" and not r["graph"]:
            return r["median_ms"]
    return None


def score(rows):
    """Mean of tpext / floor-ops over eager fwd+bwd at M=4096 and 16384; None if a row is missing."""
    ratios = []
    for m in (4096, 16384):
        t, f = eager_fwdbwd(rows, "tpext", m), eager_fwdbwd(rows, "floor-ops", m)
        if t is None or not f:
            return None
        ratios.append(t / f)
    return sum(ratios) / len(ratios)


def table(rows) -> str:
    by = {(r["M"], r["mode"], r["graph"], r["system"]): r["median_ms"] for r in rows}
    lines = []
    for (m, mode, graph) in sorted({(r["M"], r["mode"], r["graph"]) for r in rows}):
        t, f, a = (by.get((m, mode, graph, s)) for s in ("tpext", "floor-ops", "ar-tpext"))
        if None in (t, f, a):
            continue
        lines.append(f"  M={m:<6} {mode:<6} {'graph' if graph else 'eager'}: tpext {t:.4f} ms, floor-ops {f:.4f}, "
                     f"collectives {a:.4f}, tpext/floor-ops {t / f:.3f}, exposed {(t - f) / a:.2f}")
    return "\n".join(lines)


def ratio_table(rows, system, reference) -> str:
    """Per (M, mode, eager | graph): both systems' times and system / reference, where both ran."""
    by = {(r["M"], r["mode"], r["graph"], r["system"]): r["median_ms"] for r in rows}
    lines = []
    for (m, mode, graph) in sorted({(r["M"], r["mode"], r["graph"]) for r in rows}):
        t, f = by.get((m, mode, graph, system)), by.get((m, mode, graph, reference))
        if t is None or not f:
            continue
        lines.append(f"  M={m:<6} {mode:<6} {'graph' if graph else 'eager'}: {system} {t:.4f} ms, {reference} "
                     f"{f:.4f}, {system}/{reference} {t / f:.4f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+")
    p.add_argument("--table", action="store_true", help="print the first file's rows")
    p.add_argument("--ratio", nargs=2, metavar=("SYSTEM", "REFERENCE"),
                   help="print the first file's rows of SYSTEM against REFERENCE")
    args = p.parse_args()
    files = []
    for path in args.json:
        try:
            with open(path) as f:
                files.append(json.load(f)["rows"])
        except (OSError, ValueError, KeyError) as e:
            print(f"sweep_score: {path}: {e}", file=sys.stderr)
            return 1
    if args.table:
        print(table(files[0]))
        return 0
    if args.ratio:
        print(ratio_table(files[0], *args.ratio))
        return 0
    scores = [score(rows) for rows in files]
    if None in scores:
        return 1
    print(f"{statistics.median(scores):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
