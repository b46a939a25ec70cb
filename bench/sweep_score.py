"""Reads a bench/mlp.py JSON for scripts/gpu_session.sh.

    python bench/sweep_score.py RESULT.json           # the overlap sweep's score (ms; lower is better)
    python bench/sweep_score.py --table RESULT.json   # tpext, floor-ops, collectives, exposed per row

The score weighs the two fwd+bwd goals of issue 5 alike: tpext's eager M=4096 fwd+bwd time plus a
quarter of its M=16384 one (about the same size then). Prints nothing, and exits 1, when a row is
missing (a run that failed or was cut short).
"""
import argparse
import json
import sys


def eager_tpext(rows, m, mode):
    for r in rows:
        if r["system"] == "tpext" and r["M"] == m and r["mode"] == mode and not r["graph"]:
            return r["median_ms"]
    return None


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    try:
        with open(args.json) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError) as e:
        print(f"sweep_score: {args.json}: {e}", file=sys.stderr)
        return 1
    if args.table:
        print(table(rows))
        return 0
    a, b = eager_tpext(rows, 4096, "fwdbwd"), eager_tpext(rows, 16384, "fwdbwd")
    if a is None or b is None:
        return 1
    print(f"{a + b / 4:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
