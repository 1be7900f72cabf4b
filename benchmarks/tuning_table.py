"""The shared-tuning table: each model's best trial of a ``run_hyper.py`` search, and the run that confirms it.

    python benchmarks/tuning_table.py --dataset=synthetic_sparse
    python benchmarks/tuning_table.py benchmarks/results/hyper-shared-scientific-*.result

Reads RecBole's hyper result files (``run_hyper.py --output_file``: one block per trial, its
parameters, then its valid and test metrics), picks each model's trial with the best valid
NDCG@10 (ties, which the files' four decimals make common, by valid NDCG@20, then by trial order),
and prints a markdown table: the best setting, its valid and test NDCG@10, and the test NDCG@10 of
the model's own default setting where the search tried it. It then prints the ``run_reveal.py``
command that runs every model at its best setting over three seeds: a setting chosen on one
seed's validation split is confirmed on others, never picked by its test score.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from reveal_recbole.config import Config

METRIC = re.compile(r"([\w@]+) : ([-\d.e]+)")


def read_trials(text: str) -> list[dict]:
    """The trials of one result file in order: ``{"params": {...}, "valid": {...}, "test": {...}}``."""
    trials = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or lines[1:2] != ["Valid result:"] or "Test result:" not in lines:
            raise ValueError(f"not a RecBole hyper result block: {block[:80]!r}")
        split = lines.index("Test result:")
        params = dict(item.split(":", 1) for item in lines[0].split(", "))
        trials.append({
            "params": {key.strip(): float(value) for key, value in params.items()},
            "valid": {k: float(v) for line in lines[2:split] for k, v in METRIC.findall(line)},
            "test": {k: float(v) for line in lines[split + 1:] for k, v in METRIC.findall(line)},
        })
    return trials


def best_trial(trials: list[dict]) -> dict:
    """Best valid NDCG@10, then valid NDCG@20; the first in trial order among equals."""
    return max(trials, key=lambda t: (t["valid"]["ndcg@10"], t["valid"].get("ndcg@20", 0.0), -trials.index(t)))


def default_params(model: str, dataset: str, names) -> dict:
    """The model's own values for the searched parameters (its yaml over RecBole's)."""
    config = Config(model=model, dataset=dataset, config_dict={"checkpoint_dir": "saved"})
    return {name: float(config[name]) for name in names}


def model_of(path: Path, dataset: str | None) -> str:
    stem = path.stem  # hyper-shared-<dataset>-<model>
    return stem.split(f"-{dataset}-", 1)[1] if dataset and f"-{dataset}-" in stem else stem.rsplit("-", 1)[1]


def spec(model: str, params: dict) -> str:
    return model + "[" + ",".join(f"{k}={v:g}" for k, v in params.items()) + "]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="result files (default: the dataset's shared search)")
    parser.add_argument("--dataset", help="the searched dataset (finds benchmarks/results/hyper-shared-<dataset>-*)")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    files = args.files or sorted(args.results.glob(f"hyper-shared-{args.dataset}-*.result"))
    if not files:
        parser.error("no result files: give them, or --dataset with a finished search under --results")
    dataset = args.dataset or files[0].stem.split("-")[2]
    rows = []
    for path in files:
        model, trials = model_of(path, dataset), read_trials(path.read_text())
        best = best_trial(trials)
        default = default_params(model, dataset, best["params"])
        at_default = [t for t in trials if t["params"] == default]
        rows.append((model, best, at_default[0]["test"]["ndcg@10"] if at_default else None, len(trials)))
    rows.sort(key=lambda row: -row[1]["test"]["ndcg@10"])
    print("| model | best setting (valid NDCG@10) | valid NDCG@10 | test NDCG@10 | default setting's test | trials |")
    print("|---|---|---|---|---|---|")
    for model, best, default_test, count in rows:
        setting = ", ".join(f"{k} {v:g}" for k, v in best["params"].items())
        default_cell = "not searched" if default_test is None else f"{default_test:.4f}"
        print(f"| {model} | {setting} | {best['valid']['ndcg@10']:.4f} | {best['test']['ndcg@10']:.4f} "
              f"| {default_cell} | {count} |")
    models = ",".join(spec(model, best["params"]) for model, best, _, _ in rows)
    print(f"\nOMP_NUM_THREADS=1 python run_reveal.py --model=\"{models}\" --dataset={dataset} "
          "--seeds=2020,2021,2022 --utilisation_per_epoch=False --output_dir=benchmarks/results")


if __name__ == "__main__":
    main()
