#!/usr/bin/env bash
# docs/results/* and docs/results/appendix.md: every table and plot, from pipeline.analysis.compare and pipeline.analysis.grid over
# the experiments named in docs/results.md. Run from the repository root of the clone that ran them
# (`dvc exp ls` lists them), with this repository's code:  bash docs/results/make_results.sh [OUT_DOCS_DIR]
set -eu
docs=$(realpath "${1:-docs}"); out=$docs/results; mkdir -p "$out"
done_exps=$(dvc exp ls -A --name-only 2>/dev/null | tr -d ' ' | sort -u)
has() { echo "$done_exps" | grep -qx "$1"; }
entries() {  # direction, then label:short pairs -> LABEL=exp for every finished seed
  local dir=$1; shift; local list=""
  for pair in "$@"; do for s in 42 43 44; do has "$dir-${pair##*:}-s$s" && list="$list ${pair%%:*}=$dir-${pair##*:}-s$s"; done; done
  echo $list
}
PAPER=("hybrid:hybrid" "X-X-mono:xx" "X-Y:xy" "per-pair:pair")
NEW=("sequential:seq" "multitask:multitask" "neg-paragraph:negpar" "neg-query-lang:negql" "adversary:adversary" "noisy-queries:noisy")
python -m pipeline.analysis.compare $(entries mx "${PAPER[@]}") --dataset xquad_r --out "$out/compare_mlqa_to_xquad" > /dev/null
python -m pipeline.analysis.compare $(entries xm "${PAPER[@]}") --dataset mlqa_r --out "$out/compare_xquad_to_mlqa" > /dev/null
python -m pipeline.analysis.compare $(entries mx "${PAPER[@]}" "${NEW[@]}") --against hybrid --dataset xquad_r --out "$out/strategies_mlqa_to_xquad" > /dev/null
python -m pipeline.analysis.compare $(entries xm "${PAPER[@]}" "${NEW[@]}") --against hybrid --dataset mlqa_r --out "$out/strategies_xquad_to_mlqa" > /dev/null
# The strategies again at temperature 0.01, the default since #20 (runs named mx01-*).
T01=("hybrid:hybrid" "X-X-mono:xx" "X-Y:xy" "sequential:seq" "multitask:multitask" "neg-query-lang:negql")
python -m pipeline.analysis.compare $(entries mx01 "${T01[@]}") --against hybrid --dataset xquad_r --out "$out/strategies_t01_mlqa_to_xquad" > /dev/null
python -m pipeline.analysis.grid --num -1 --match 'mx01-*' --group seed --dataset xquad_r --out "$out/summary_t01_mlqa_to_xquad" > /dev/null
python -m pipeline.analysis.grid --num -1 --match 'mx-*' --group seed --dataset xquad_r --out "$out/summary_mlqa_to_xquad" > /dev/null
python -m pipeline.analysis.grid --num -1 --match 'xm-*' --group seed --dataset mlqa_r --out "$out/summary_xquad_to_mlqa" > /dev/null
drops=$(for n in typo_0.05 typo_0.15 no_diacritics lowercase; do echo -n "noise.$n.multi_drop,"; done)
python -m pipeline.analysis.grid --num -1 --match 'mx-*' --group seed --dataset xquad_r --figures "noise.clean.multi_map,${drops%,}" --out "$out/robustness_mlqa_to_xquad" > /dev/null
# Issue #28: the earlier reports re-tested at seed level from their committed per-arm means and sds
python -m pipeline.analysis.reassess "$out"/strategies_mlqa_to_xquad.csv "$out"/strategies_xquad_to_mlqa.csv \
    "$out"/strategies_t01_mlqa_to_xquad.csv "$out"/compare_mlqa_to_xquad.csv "$out"/compare_xquad_to_mlqa.csv \
    "$out"/default_temperature.csv "$out"/default_temperature_xquad_to_mlqa.csv --out "$out/reassessed" > /dev/null
# The default against the zero-shot base (README's table): the workspace's run (seed 42) and `dvc exp run -n default-sNN -S seed=NN`
if has default-s43 && has default-s44; then
  python -m pipeline.analysis.compare base=workspace:metrics/eval_base_queries default=workspace default=default-s43 default=default-s44 \
      --against base --dataset xquad_r --out "$out/default_vs_base" > /dev/null
fi
# Issue #30's first runs: mined hard negatives against the default's, on dev (the choice) and on test
if has default-s43 && has default-s44 && has mined-s42 && has mined-s43 && has mined-s44; then
  arms="query_language=workspace query_language=default-s43 query_language=default-s44 mined=mined-s42 mined=mined-s43 mined=mined-s44"
  python -m pipeline.analysis.compare $arms --against query_language --dataset dev --queries-dir metrics/dev_queries \
      --out "$out/dev/mined_vs_query_language" > /dev/null
  python -m pipeline.analysis.compare $arms --against query_language --dataset xquad_r --out "$out/mined_vs_query_language" > /dev/null
fi
# Issue #30: docs/results.md's first section and its tables (docs/results/answer/), from the runs docs/results/answer.yaml names
python -m pipeline.analysis.answer docs/results/answer.yaml > /dev/null
# docs/results/appendix.md: appendix.template.md with each {{name}} replaced by docs/results/<name>.md
python - "$docs" <<'PY'
import re, sys
from pathlib import Path
docs = Path(sys.argv[1])
template = (docs / "results" / "appendix.template.md").read_text(encoding="utf-8")
include = lambda m: (docs / "results" / f"{m.group(1)}.md").read_text(encoding="utf-8").strip()
(docs / "results" / "appendix.md").write_text(re.sub(r"\{\{(\w+)\}\}", include, template), encoding="utf-8")
print("wrote", docs / "results" / "appendix.md")
PY
