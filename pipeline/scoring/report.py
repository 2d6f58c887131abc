"""What the evaluation shows a person: the console tables and the plot files for `dvc plots`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.scoring.lareqa import SETTINGS, TaskScores


def write_plots(results: dict[str, TaskScores], noise_reports: dict[str, dict], plots_dir: Path) -> None:
    """The tables `dvc plots` draws (dvc.yaml's `plots:`), into `plots_dir`: per-pair mAP (pairs.csv, the X→Y
    heatmaps), the per-language and per-resource-class tables and, with noise, mAP of each setting clean and
    under each noise (noise.csv)."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    pairs, languages, classes = [], [], []
    for name, scores in results.items():
        long = scores.pair_map.rename_axis(index="query_lang", columns="passage_lang").stack()
        pairs.append(long.rename("map").reset_index().assign(dataset=name))
        languages.append(scores.languages.rename_axis("lang").reset_index().assign(dataset=name))
        classes.append(scores.resource_classes.reset_index().assign(dataset=name))
    columns = ["dataset", "query_lang", "passage_lang", "map"]
    pd.concat(pairs)[columns].round(6).to_csv(plots_dir / "pairs.csv", index=False)
    lang_columns = ["dataset", "lang", "multi_map", "multi_recall_at_10", "multi_ndcg_at_10", "rank_distance", "language_preference"]
    pd.concat(languages)[lang_columns].round(6).to_csv(plots_dir / "languages.csv", index=False)
    class_table = pd.concat(classes)
    class_table["resource_class"] = "class " + class_table["resource_class"].astype(str)  # a category on the plot's axis
    class_table[["dataset", *class_table.columns.drop("dataset")]].round(6).to_csv(plots_dir / "resource_classes.csv", index=False)
    noise_rows = [
        {"dataset": name, "noise": noise, **{key: figures[key] for key in SETTINGS}}
        for name, report in noise_reports.items()
        for noise, figures in report.items()
        if noise != "queries"
    ]
    if noise_rows:
        pd.DataFrame(noise_rows).to_csv(plots_dir / "noise.csv", index=False)


def format_summary(name: str, summary: dict) -> str:
    head = (
        f"{name}: Mo. mAP {summary['mono_map']:.4f}  Cr. mAP {summary['cross_map']:.4f}  "
        f"Mul. mAP {summary['multi_map']:.4f}  rank distance {summary['rank_distance']:.1f}\n"
        f"  Mo. R@1 {summary['mono_recall_at_1']:.4f}  Cr. R@1 {summary['cross_recall_at_1']:.4f}  "
        f"Mul. R@10 {summary['multi_recall_at_10']:.4f}  Mul. nDCG@10 {summary['multi_ndcg_at_10']:.4f}\n"
        f"  own-language answer first {summary['language_preference']:.3f} (chance {summary['language_preference_chance']:.3f})  "
        f"top-1 errors that are siblings of the answer: Mo. {summary['mono_sibling_errors']:.3f}  Cr. {summary['cross_sibling_errors']:.3f}"
    )
    rows = [f"  {'lang':<5}{'Mo. mAP':>9}{'Mul. mAP':>10}{'Mul. R@10':>11}{'Mul. nDCG@10':>14}{'rank dist':>11}{'own first':>11}"]
    for lang, row in summary["lang"].items():
        rows.append(
            f"  {lang:<5}{row['mono_map']:>9.4f}{row['multi_map']:>10.4f}{row['multi_recall_at_10']:>11.4f}"
            f"{row['multi_ndcg_at_10']:>14.4f}{row['rank_distance']:>11.1f}{row['language_preference']:>11.3f}"
        )
    for cls, row in summary["resource_class"].items():
        rows.append(
            f"  class {cls} ({row['languages']:.0f} languages, Joshi et al. 2020): Mo. mAP {row['mono_map']:.4f}  "
            f"Mul. mAP {row['multi_map']:.4f}  rank distance {row['rank_distance']:.1f}  own first {row['language_preference']:.3f}"
        )
    return "\n".join([head, *rows])


def format_noise(name: str, report: dict, per_lang: int | None) -> str:
    sample = f"{per_lang} per language" if per_lang else "all"
    rows = [
        f"{name} under noise ({report['queries']} queries, {sample}): mAP, and drop from clean",
        f"  {'noise':<15}{'Mo.':>8}{'Cr.':>8}{'Mul.':>8}{'Mo. drop':>10}{'Cr. drop':>10}{'Mul. drop':>10}  unchanged",
    ]
    for noise, figures in report.items():
        if noise == "queries":
            continue
        line = f"  {noise:<15}" + "".join(f"{figures[key]:>8.4f}" for key in SETTINGS)
        if noise != "clean":
            drops = "".join(f"{figures[key.replace('_map', '_drop')]:>10.4f}" for key in SETTINGS)
            by_lang = ", ".join(f"{lang} {n}" for lang, n in figures["unchanged_by_lang"].items() if n)
            line += f"{drops}  {figures['unchanged']}" + (f" ({by_lang})" if by_lang else "")
        rows.append(line)
    return "\n".join(rows)
