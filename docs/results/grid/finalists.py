"""Phase 2 of the GPU grid: the 3 phase-1 configs with the highest Mo. + Cr. + Mul. mAP on XQuAD-R
(the default's seeds aside), each again with seeds 43 and 44, as a grid file for in_process_grid.py."""

import csv
import sys

import yaml

grid, results, out = sys.argv[1:4]
sets = {entry["name"]: entry.get("set", {}) for entry in yaml.safe_load(open(grid))}
with open(results, newline="") as f:
    rows = [r for r in csv.DictReader(f) if not r["name"].startswith("default-s")]
score = {r["name"]: sum(float(r[f"xquad_r.{k}_map"]) for k in ("mono", "cross", "multi")) for r in rows}
best = sorted(score, key=score.get, reverse=True)[:3]
print("finalists:", ", ".join(f"{name} ({score[name]:.4f})" for name in best))
entries = [{"name": f"{name}-s{seed}", "set": {**sets[name], "seed": seed}} for seed in (43, 44) for name in best if name != "default"]
yaml.safe_dump(entries, open(out, "w"), sort_keys=False)
