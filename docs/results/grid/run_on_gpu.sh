#!/usr/bin/env bash
# The GPU grid as it was run on 2026-11-26 (docs/results/grid.md), from the repository root on a
# machine holding models/base, data/parallel and data/raw (those of the default), writing to $1:
# phase 1 (grid1.yaml, one knob at a time) for at most $2 seconds; phase 2 (finalists.py: the best
# three of phase 1 again with seeds 43 and 44) for at most $3; phase 3 (grid3.yaml: the winner,
# temperature 0.01, combined with the other knobs, written after reading phases 1-2) for at most $4.
set -u
out=$1; here=docs/results/grid
grid() { timeout "$1" python3 benchmarks/in_process_grid.py "$2" --out "$3" --eval-batch-size 256; }
grid "$2" $here/grid1.yaml "$out/grid1.csv"
python3 $here/finalists.py $here/grid1.yaml "$out/grid1.csv" "$out/grid2.yaml"
grid "$3" "$out/grid2.yaml" "$out/grid2.csv"
grid "$4" $here/grid3.yaml "$out/grid3.csv"
