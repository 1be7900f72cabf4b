"""Comparison tables: several models (and variants) on one dataset, split and seed list.

``compare`` runs each ``Name`` or ``Name[key=value,...]`` spec once per seed through
:func:`reveal_recbole.quick_start.run_reveal` and tables mean ± std per metric, the gain of each
``XREVEAL`` over ``X``, the visual-utilisation drops and seconds per epoch; a second table splits
the test targets into warm and cold (no training interaction, e.g. with ``cold_item_share``) and
warm head / torso / tail (:mod:`reveal_recbole.target_buckets`), with their counts.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import statistics
import time
from pathlib import Path

import yaml

from reveal_recbole.atomic import atomic_write_text
from reveal_recbole.errors import ConfigError, UnknownModelError, UserInputError
from reveal_recbole.quick_start import run_reveal
from reveal_recbole.registry import get_model

REPORT_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
# The validation metric the tables report beside the test ones, to choose a row by (never by test).
SELECTION_METRIC = "ndcg@10"
# Named model lists for compare (``--model=peers``): each name expands to its specs, in this order.
# peers: the ID-only baseline, REVEAL on two backbones (which is best depends on the set: BENCHMARKS.md),
# the training-free feature baseline, RecBole's feature-aware models and the package's multimodal peers on
# the same features, then "peer + REVEAL" rows.
SUITES: dict[str, tuple[str, ...]] = {
    "peers": ("SASRec", "SASRecREVEAL", "NARMREVEAL", "FeatureKNN", "SASRecF", "FDSA", "GRU4RecF", "UniSRec", "M3SRec",
              "MISSRec", "SASRecF[avl=True]", "M3SRec[avl=True]"),
}
BUCKET_METRICS = ("ndcg@10", "recall@20")
TABLE_BUCKETS = ("all", "warm", "cold", "head", "torso", "tail")


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"SASRecREVEAL[avl=False,fusion=gated]"`` -> ``("SASRecREVEAL", {"avl": False, "fusion": "gated"})``."""
    match = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(?:\[(.*)\])?\s*", spec)
    if match is None:
        raise ConfigError(f"bad model spec {spec!r}: expected Name or Name[key=value,...]")
    overrides = {}
    for pair in filter(None, (match.group(2) or "").split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad override {pair!r} in model spec {spec!r}: expected key=value")
        overrides[key.strip()] = yaml.safe_load(value.strip())
    return match.group(1), overrides


def seed_list(text: str) -> list[int]:
    """The scripts' ``--seeds``: ``"2020,2021,2022"`` -> ``[2020, 2021, 2022]``; anything else is a usage error."""
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integer seeds, e.g. 2020,2021,2022; got {text!r}") from None


def expand_suites(specs: list[str]) -> list[str]:
    """Replace each suite name (:data:`SUITES`) by its model specs; a spec listed twice runs once.

    A suite's model that does not resolve here (a peer this installation lacks) is left out, logged.
    """
    expanded = []
    for spec in specs:
        if spec not in SUITES:
            expanded.append(spec)
            continue
        for member in SUITES[spec]:
            try:
                get_model(parse_model_spec(member)[0])
            except UnknownModelError:
                logging.getLogger(__name__).warning(f"suite {spec}: {member} is not available here: left out")
                continue
            expanded.append(member)
    return list(dict.fromkeys(expanded))


def summarise(results: dict[str, list[dict]], metrics=REPORT_METRICS) -> list[dict]:
    """Mean and sample std over seeds of each test metric, the mean best-valid NDCG@10 (None unless every run
    recorded it), seconds per epoch, and utilisation drops."""
    summary = []
    for label, runs in results.items():
        row = {"model": label, "seeds": len(runs)}
        for metric in metrics:
            values = [float(r["test_result"][metric]) for r in runs]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        valid = [float(r["best_valid_result"][SELECTION_METRIC]) for r in runs
                 if SELECTION_METRIC in (r.get("best_valid_result") or {})]
        row[f"valid_{SELECTION_METRIC}"] = statistics.fmean(valid) if len(valid) == len(runs) else None
        row["s_per_epoch"] = statistics.fmean(r["train_seconds"] / max(r["epochs"], 1) for r in runs)
        for modality in ("image", "text"):
            drops = [r["utilisation"]["drop"][modality]["ndcg@10"] for r in runs
                     if modality in r.get("utilisation", {}).get("drop", {})]
            row[f"{modality}_masked_drop_ndcg@10"] = statistics.fmean(drops) if drops else None
        summary.append(row)
    return summary


def summarise_buckets(results: dict[str, list[dict]], metrics=BUCKET_METRICS) -> list[dict]:
    """Per model (runs with bucket results only): mean and std over seeds of each bucket's metrics, mean counts.

    A bucket without targets in a run (``n`` = 0, metric None) is left out of that bucket's mean.
    """
    summary = []
    for label, runs in results.items():
        runs = [r for r in runs if r.get("buckets")]
        if not runs:
            continue
        row = {"model": label, "seeds": len(runs)}
        for bucket in TABLE_BUCKETS:
            row[f"{bucket}_n"] = statistics.fmean(r["buckets"][bucket]["n"] for r in runs)
            for metric in metrics:
                values = [r["buckets"][bucket][metric] for r in runs if r["buckets"][bucket][metric] is not None]
                row[f"{bucket}_{metric}"] = statistics.fmean(values) if values else None
                row[f"{bucket}_{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def bucket_table(summary: list[dict], metrics=BUCKET_METRICS) -> list[list[str]]:
    """Markdown/CSV rows: per bucket mean +- std of each metric, the cold/warm NDCG@10 ratio, mean target counts."""
    header = ["model", "seeds", "targets all / warm / cold", "cold / warm NDCG@10"]
    header += [f"{m} {b}" for m in metrics for b in TABLE_BUCKETS]
    header += ["targets head / torso / tail"]
    rows = [header]

    def cell(row, key):
        return "–" if row[key] is None else f"{row[key]:.4f} ± {row[key + '_std']:.4f}"

    def counts(row, buckets):
        return " / ".join(f"{row[f'{b}_n']:.0f}" for b in buckets)

    for row in summary:
        warm, cold = row["warm_ndcg@10"], row["cold_ndcg@10"]
        ratio = f"{cold / warm:.2f}" if warm and cold is not None else "–"
        rows.append([row["model"], str(row["seeds"]), counts(row, ("all", "warm", "cold")), ratio,
                     *(cell(row, f"{b}_{m}") for m in metrics for b in TABLE_BUCKETS),
                     counts(row, ("head", "torso", "tail"))])
    return rows


def relative_improvement(summary: list[dict], metric: str) -> dict[str, float]:
    """For each ``XREVEAL[...]`` row, its relative gain in ``metric`` over the row named ``X``; for each
    other ``X[...]`` row (a peer with REVEAL's parts switched on, ``SASRecF[avl=True]``), over the row ``X``."""
    by_label = {row["model"]: row for row in summary}
    gains = {}
    for row in summary:
        name, overrides = parse_model_spec(row["model"])
        if name.endswith("REVEAL"):
            backbone = by_label.get(name[: -len("REVEAL")])
        else:
            backbone = by_label.get(name) if overrides else None
        if backbone and backbone[metric] > 0:
            gains[row["model"]] = row[metric] / backbone[metric] - 1.0
    return gains


def comparison_table(summary: list[dict], metrics=REPORT_METRICS) -> list[list[str]]:
    """Markdown/CSV rows: mean +- std per metric (best mean marked ``*``), gain over the backbone, cost."""
    best = {m: max(row[m] for row in summary) for m in metrics}
    gains = {m: relative_improvement(summary, m) for m in ("ndcg@10", "recall@20")}
    rows = [["model", "seeds", *metrics, "valid NDCG@10", "NDCG@10 vs backbone", "Recall@20 vs backbone",
             "image-masked drop NDCG@10", "text-masked drop NDCG@10", "s/epoch"]]
    for row in summary:
        cells = [f"{row[m]:.4f} ± {row[m + '_std']:.4f}" + ("*" if row[m] == best[m] else "") for m in metrics]
        gain_cells = [f"{gains[m][row['model']]:+.1%}" if row["model"] in gains[m] else "" for m in gains]
        drops = [f"{row[k]:.4f}" if row[k] is not None else ""
                 for k in ("image_masked_drop_ndcg@10", "text_masked_drop_ndcg@10")]
        valid = row.get(f"valid_{SELECTION_METRIC}")
        valid_cell = "" if valid is None else f"{valid:.4f}"
        rows.append([row["model"], str(row["seeds"]), *cells, valid_cell, *gain_cells, *drops,
                     f"{row['s_per_epoch']:.1f}"])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def _run_record(spec: str, result: dict) -> dict:
    """What the comparison table needs of one run, as JSON."""
    keys = ("seed", "test_result", "best_valid_result", "epochs", "train_seconds", "utilisation", "buckets")
    return json.loads(json.dumps({"spec": spec} | {k: result[k] for k in keys if k in result}, default=float))


def read_run_records(path: str | Path) -> list[dict]:
    """The finished runs recorded by an earlier (perhaps interrupted) ``compare``."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"cannot resume the comparison: no file {path}") from None
    except json.JSONDecodeError as error:
        raise UserInputError(f"cannot resume the comparison: {path} is not a runs file ({error})") from None
    required = {"spec", "seed", "test_result"}
    if not isinstance(records, list) or not all(isinstance(r, dict) and required <= set(r) for r in records):
        raise UserInputError(f"cannot resume the comparison: {path} is not a list of run records")
    return records


def compare(models, dataset, seeds=None, config_file_list=None, config_dict=None, output_dir="results", saved=True,
            resume=None):
    """Run each model spec (``Name`` or ``Name[key=value,...]``) for each seed on one dataset and config.

    Every model sees the same data, leave-one-out split and seed list. Writes
    ``compare-<dataset>-<time>.md`` / ``.csv`` (the summary) and ``-runs.csv`` (one row per run).
    Each finished run is recorded at once in ``-runs.json``; ``resume=<that file>`` reruns only
    the (model, seed) pairs it lacks and writes the tables next to it.
    """
    if resume is not None:
        stem = Path(resume).with_name(Path(resume).name.removesuffix("-runs.json"))
        records = read_run_records(resume)
    else:
        stem = Path(output_dir) / f"compare-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        records = []
    runs_file = stem.with_name(stem.name + "-runs.json")

    def wanted(record: dict, spec: str, seed: int | None) -> bool:
        return record["spec"] == spec and (seed is None or record["seed"] == seed)

    results: dict[str, list[dict]] = {}
    for spec in models:
        model, overrides = parse_model_spec(spec)
        for seed in seeds or [None]:  # None: the configured seed
            finished = [r for r in records if wanted(r, spec, seed)]
            if not finished:
                settings = dict(config_dict or {}) | overrides | ({} if seed is None else {"seed": seed})
                finished = [_run_record(spec, run_reveal(model, dataset, config_file_list, settings, saved=saved))]
                records += finished
                atomic_write_text(runs_file, json.dumps(records, indent=1) + "\n")
            results.setdefault(spec, []).append(finished[0])
    bucket_columns = [(b, key) for b in ("warm", "cold") for key in ("n", *BUCKET_METRICS)]
    run_rows = [["model", "seed", *REPORT_METRICS, f"valid {SELECTION_METRIC}", "epochs", "train_seconds",
                 *(f"{b} {k}" for b, k in bucket_columns)]]
    run_rows += [[r["spec"], r["seed"], *(r["test_result"][m] for m in REPORT_METRICS),
                  (r.get("best_valid_result") or {}).get(SELECTION_METRIC, ""), r["epochs"],
                  f"{r['train_seconds']:.1f}", *(_bucket_value(r, b, k) for b, k in bucket_columns)]
                 for runs in results.values() for r in runs]
    rows = comparison_table(summarise(results))
    atomic_write_text(stem.with_suffix(".md"), markdown_table(rows))
    atomic_write_text(stem.with_suffix(".csv"), csv_text(rows))
    atomic_write_text(stem.with_name(stem.name + "-runs.csv"), csv_text(run_rows))
    print(markdown_table(rows))
    targets = stem.with_name(stem.name + "-targets")
    bucket_summary = summarise_buckets(results)
    if bucket_summary:
        bucket_rows = bucket_table(bucket_summary)
        atomic_write_text(targets.with_suffix(".md"), markdown_table(bucket_rows))
        atomic_write_text(targets.with_suffix(".csv"), csv_text(bucket_rows))
        print("Test metrics by target (cold: no training interaction; head/torso/tail: warm targets by training count)")
        print(markdown_table(bucket_rows))
    print(f"saved {stem.with_suffix('.md')}, {stem.with_suffix('.csv')}, {stem.name}-runs.csv/.json"
          + (f" and {targets.name}.md/.csv" if bucket_summary else ""))
    return results, rows


def _bucket_value(record: dict, bucket: str, key: str):
    value = (record.get("buckets") or {}).get(bucket, {}).get(key)
    return "" if value is None else value


def csv_text(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()
