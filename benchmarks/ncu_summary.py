"""A short table from an Nsight Compute report's CSV pages (scripts/gpu_check.sh ncu).

    python -m benchmarks.ncu_summary DETAILS.csv [RAW.csv]

Per kernel: time, grid, registers, occupancy, issue rate, and (from the raw page) the largest
warp stall reasons in cycles per issued instruction.
"""

from __future__ import annotations

import csv
import sys
from collections import OrderedDict

DETAILS = ("Duration", "Registers Per Thread", "Achieved Occupancy", "Theoretical Occupancy",
           "Issued Warp Per Scheduler", "Active Warps Per Scheduler", "Eligible Warps Per Scheduler",
           "Warp Cycles Per Issued Instruction", "DRAM Throughput", "Memory Throughput", "Executed Ipc Active")


def details(path: str):
    kernels: "OrderedDict[str, dict]" = OrderedDict()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = row.get("ID", "?")
            k = kernels.setdefault(key, {"name": row.get("Kernel Name", "?")[:40], "grid": row.get("Grid Size", ""),
                                         "block": row.get("Block Size", "")})
            if row.get("Metric Name") in DETAILS:
                k[row["Metric Name"]] = f'{row.get("Metric Value", "")} {row.get("Metric Unit", "")}'.strip()
    return kernels


def stalls(path: str, top: int = 6):
    """Per kernel row: the largest ``smsp__average_warps_issue_stalled_*_per_issue_active`` ratios."""
    out = []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3:
        return out
    head = rows[0]
    cols = [i for i, h in enumerate(head) if h.startswith("smsp__average_warps_issue_stalled_")
            and h.endswith("_per_issue_active.ratio")]
    name_col = head.index("Kernel Name") if "Kernel Name" in head else None
    for r in rows[2:]:
        vals = []
        for i in cols:
            try:
                vals.append((float(r[i].replace(",", "")), head[i][len("smsp__average_warps_issue_stalled_"):
                                                                   -len("_per_issue_active.ratio")]))
            except (ValueError, IndexError):
                pass
        vals.sort(reverse=True)
        name = r[name_col][:40] if name_col is not None else "?"
        out.append((name, vals[:top]))
    return out


def main(argv=None) -> int:
    argv = argv or sys.argv[1:]
    for key, k in details(argv[0]).items():
        print(f"[{key}] {k['name']} grid {k['grid']} block {k['block']}")
        print("    " + "; ".join(f"{m}: {k[m]}" for m in DETAILS if m in k))
    if len(argv) > 1:
        for name, vals in stalls(argv[1]):
            print(f"stalls {name}: " + ", ".join(f"{n} {v:.1f}" for v, n in vals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
