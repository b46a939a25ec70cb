"""PNG plots from a bench/mlp.py results JSON (matplotlib; skipped, with the reason printed, where
matplotlib is not installed):

    python bench/plot.py bench/results/mlp-nvidia-h200-x2-<stamp>.json [--outdir DIR]

<stem>-time.png             time per call against M, one line per system (solid eager, dashed CUDA
                            graph), one panel per workload x mode, log-log
<stem>-exposed-<wl>.png     per workload: stacked bars per TP system, the floor (same shards, no
                            collectives) at the bottom and what the system takes beyond it on top
                            (exposed communication plus framework overhead); the dotted line marks
                            floor + the all-reduces alone (no overlap at all). One panel per
                            mode x eager|graph (rows) and M (columns)

bench/mlp.py calls make_plots() on rank 0 after writing its JSON. Importing this module never
needs matplotlib.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

TP_SYSTEMS = ("tpext", "seed", "dtensor", "megatron", "symm-mem")
FLOORS = ("floor", "floor-ops")
COLLECTIVES = ("ar-tpext", "ar-torch")
STYLE = {  # one colour per system across every figure
    "tpext": "tab:red", "seed": "tab:blue", "dtensor": "tab:green", "megatron": "tab:purple",
    "symm-mem": "tab:brown", "single": "black", "single-ops": "dimgray", "floor": "tab:orange",
    "floor-ops": "gold", "ar-tpext": "tab:pink", "ar-torch": "tab:cyan",
}


def _pyplot():
    """matplotlib.pyplot with a file-only backend, or (None, reason)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt, None
    except Exception as e:  # ImportError, or a broken installation
        return None, f"{type(e).__name__}: {e}"


def make_plots(json_path: str, outdir: Optional[str] = None) -> List[str]:
    """Writes the PNGs next to the JSON (or into outdir); returns their paths ([] when skipped)."""
    plt, why = _pyplot()
    if plt is None:
        print(f"plots skipped: matplotlib is not available ({why})", flush=True)
        return []
    with open(json_path) as f:
        data = json.load(f)
    rows = data.get("rows", [])
    if not rows:
        print("plots skipped: the JSON has no rows", flush=True)
        return []
    outdir = outdir or os.path.dirname(os.path.abspath(json_path))
    os.makedirs(outdir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(json_path))[0]
    paths = [_time_plot(plt, rows, data, os.path.join(outdir, f"{stem}-time.png"))]
    for wl in _ordered(r["workload"] for r in rows):
        p = _exposed_plot(plt, [r for r in rows if r["workload"] == wl], wl,
                          os.path.join(outdir, f"{stem}-exposed-{wl}.png"))
        if p:
            paths.append(p)
    for p in paths:
        print(f"wrote {p}", flush=True)
    return paths


def _ordered(values):
    return list(dict.fromkeys(values))


def _time_plot(plt, rows, data, path):
    workloads = _ordered(r["workload"] for r in rows)
    modes = _ordered(r["mode"] for r in rows)
    fig, axes = plt.subplots(len(workloads), len(modes), figsize=(6.5 * len(modes), 4.2 * len(workloads)),
                             squeeze=False)
    for i, wl in enumerate(workloads):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in rows if r["workload"] == wl and r["mode"] == mode]
            for system in _ordered(r["system"] for r in sel):
                for graphed in (False, True):
                    pts = sorted((r["M"], r["median_ms"]) for r in sel
                                 if r["system"] == system and r["graph"] == graphed)
                    if not pts:
                        continue
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                            linestyle="--" if graphed else "-", color=STYLE.get(system),
                            label=f"{system}{' (graph)' if graphed else ''}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("ms per call (slowest rank's median)")
            ax.set_title(f"{wl}: {data.get('workloads', {}).get(wl, {}).get('describe', '')} - {mode}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    dev = data.get("metadata", {}).get("devices", [{}])[0].get("name", "?")
    fig.suptitle(f"bench/mlp.py on {data.get('metadata', {}).get('world_size', '?')} x {dev}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _exposed_plot(plt, rows, wl, path):
    panels = [(mode, g) for mode in _ordered(r["mode"] for r in rows) for g in (False, True)
              if any(r["mode"] == mode and r["graph"] == g for r in rows)]
    ms = sorted({r["M"] for r in rows})
    if not panels or not ms:
        return None
    fig, axes = plt.subplots(len(panels), len(ms), figsize=(3.2 * len(ms), 3.0 * len(panels) + 0.6), squeeze=False)
    drew, handles, labels = False, [], []
    for i, (mode, graphed) in enumerate(panels):
        for j, m in enumerate(ms):
            ax = axes[i][j]
            by = {r["system"]: r for r in rows if r["mode"] == mode and r["graph"] == graphed and r["M"] == m}
            floors = [by[f]["median_ms"] for f in FLOORS if f in by]
            colls = [by[c]["median_ms"] for c in COLLECTIVES if c in by]
            names = [s for s in TP_SYSTEMS if s in by]
            ax.set_title(f"{mode} {'graph' if graphed else 'eager'} M={m}", fontsize=8)
            if not floors or not names:
                ax.text(0.5, 0.5, "no floor" if not floors else "no TP system", ha="center", transform=ax.transAxes)
                continue
            floor = min(floors)
            # A system below the floor (noise, or better kernels than the floor's) shows its own time.
            bottoms = [min(floor, by[s]["median_ms"]) for s in names]
            tops = [max(0.0, by[s]["median_ms"] - floor) for s in names]
            x = range(len(names))
            ax.bar(x, bottoms, color="lightgray", label="floor (GEMMs, no comm)")
            ax.bar(x, tops, bottom=bottoms, color=[STYLE.get(s) for s in names], label="beyond the floor")
            if colls:
                ax.axhline(floor + min(colls), color="black", linestyle=":", linewidth=1,
                           label="floor + all-reduces alone")
            ax.set_xticks(list(x))
            ax.set_xticklabels(names, rotation=45, fontsize=7)
            ax.set_ylabel("ms", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            if not drew:
                handles, labels = ax.get_legend_handles_labels()
            drew = True
    if not drew:
        plt.close(fig)
        return None
    fig.suptitle(f"{wl}: GEMM floor vs what each TP system adds (exposed communication + overhead)", fontsize=10)
    # One legend for the figure, below the title, so it hides no bar.
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json_path")
    p.add_argument("--outdir", default=None)
    args = p.parse_args(argv)
    make_plots(args.json_path, args.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
