"""Figures of finished runs, drawn from what every run already writes; nothing is re-run.

    python -m reveal_recbole.plots --runs log_tensorboard saved --out figures

- ``training_curves.png``: train loss and a valid metric (default NDCG@10) per epoch, one line
  per run, from the run's tensorboard events (``log_tensorboard/<run>/``: RecBole's
  ``Loss/Train``, our ``Valid/<metric>``). Tensorboard events are written by every trainer
  (REVEAL, baselines, hyperparameter trials, DDP rank 0) whatever the log level, in a stable
  format; RecBole's text log is not (``state: WARNING`` drops the epoch lines).
- ``utilisation.png``: the visual-utilisation drops (``Utilisation/<modality>_masked/<metric>``).
- ``avl-<run>.png``: K_v and per-modality gradient norms per step from each AVL CSV
  (``saved/<Model>-<time>-avl.csv``).

``--runs`` takes folders (searched recursively for event files and ``*-avl.csv``) or files.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from reveal_recbole.diagnostics import plot_grad_norms, plot_k_v, plot_utilisation, pyplot, read_avl_csv, save_png

EVENTS_GLOB = "events.out.tfevents.*"
AVL_SUFFIX = "-avl.csv"
# Tensorboard folder names: RecBole's <model>-<dataset>-<Mon-DD-YYYY_HH-MM-SS>-<config hash>, or
# <model>-<dataset>-<time>[-<n>] for later runs in one process (reveal_recbole.trainer.base)
RUN_NAME = re.compile(r"(?P<model>[^-]+)-(?P<dataset>.+)-[A-Z][a-z]{2}-\d{2}-\d{4}_(?P<hms>\d{2}-\d{2}-\d{2})(-\w+)?")
Scalars = dict[str, dict[int, float]]


def find_runs(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(tensorboard run folders, AVL CSV files) under ``paths``."""
    run_dirs, avl_csvs = set(), set()
    for path in map(Path, paths):
        if path.is_dir():
            run_dirs.update(event.parent for event in path.rglob(EVENTS_GLOB))
            avl_csvs.update(path.rglob(f"*{AVL_SUFFIX}"))
        elif path.name.startswith("events.out.tfevents."):
            run_dirs.add(path.parent)
        elif path.name.endswith(AVL_SUFFIX):
            avl_csvs.add(path)
        else:
            raise FileNotFoundError(f"{path}: not a folder, a tensorboard event file or an AVL CSV")
    return sorted(run_dirs), sorted(avl_csvs)


def read_scalars(run_dir: str | Path) -> Scalars:
    """Every scalar of one tensorboard run: tag -> {step: value} (a step written twice keeps its last value)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    accumulator.Reload()
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()[SCALARS]
    }


def run_label(run_dir: Path) -> str:
    """``SASRecREVEAL (scientific, 20-38-00)`` from RecBole's run name; the folder name otherwise."""
    match = RUN_NAME.fullmatch(run_dir.name)
    if match is None:
        return run_dir.name
    return f"{match['model']} ({match['dataset']}, {match['hms'].replace('-', ':')})"


def training_runs(run_dirs: Sequence[Path]) -> dict[str, Scalars]:
    """Runs that trained at least one epoch, by a unique label."""
    runs: dict[str, Scalars] = {}
    for run_dir in run_dirs:
        scalars = read_scalars(run_dir)
        if "Loss/Train" not in scalars:  # e.g. DDP ranks > 0, RecBole's hparams sub-folder
            continue
        label = run_label(run_dir)
        runs[label if label not in runs else f"{label} {run_dir.name}"] = scalars
    return runs


def valid_curve(scalars: Scalars, metric: str) -> tuple[Optional[dict[int, float]], str]:
    """Per-epoch valid ``metric`` and a label note; runs of plain RecBole trainers have only
    RecBole's ``Vaild_score`` (of the run's ``valid_metric``, whichever it was)."""
    if f"Valid/{metric}" in scalars:
        return scalars[f"Valid/{metric}"], ""
    return scalars.get("Vaild_score"), " [RecBole valid score]"


def utilisation_drops(scalars: Scalars) -> dict[str, dict[str, float]]:
    """``Utilisation/<modality>_masked/<metric>`` scalars as {modality: {metric: drop}}."""
    drops: dict[str, dict[str, float]] = {}
    for tag, values in scalars.items():
        parts = tag.split("/")
        if len(parts) == 3 and parts[0] == "Utilisation" and parts[1].endswith("_masked"):
            drops.setdefault(parts[1].removesuffix("_masked"), {})[parts[2]] = values[max(values)]
    return drops


def _plot_curve(ax, curve: dict[int, float], label: str, color: str) -> None:
    epochs = sorted(curve)
    ax.plot(epochs, [curve[e] for e in epochs], marker="o", ms=3, lw=1.2, label=label, color=color)


def plot_training_curves(runs: dict[str, Scalars], output: str | Path, metric: str = "ndcg@10") -> Path:
    """Train loss and valid ``metric`` per epoch, one line per run."""
    plt = pyplot()
    fig, (loss_ax, valid_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, scalars) in enumerate(runs.items()):
        color = f"C{i % 10}"
        curve, note = valid_curve(scalars, metric)
        _plot_curve(loss_ax, scalars["Loss/Train"], label + note, color)
        if curve:
            _plot_curve(valid_ax, curve, label + note, color)
    loss_ax.set(title="train loss", xlabel="epoch", ylabel="loss (sum over batches)")
    valid_ax.set(title=f"valid {metric}", xlabel="epoch", ylabel=metric)
    for ax in (loss_ax, valid_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles, labels = loss_ax.get_legend_handles_labels()
    columns = min(len(labels), 3)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize="small", frameon=False)
    rows = -(-len(labels) // columns)
    fig.tight_layout(rect=(0, min(0.08 * rows, 0.5), 1, 1))
    return save_png(fig, output)


def plot_utilisation_runs(drops: dict[str, dict[str, dict[str, float]]], output: str | Path) -> Path:
    """One utilisation bar panel per run."""
    columns = min(len(drops), 3)
    rows = -(-len(drops) // columns)
    fig, axes = pyplot().subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (label, drop) in zip(flat, drops.items()):
        plot_utilisation(ax, drop, title=f"{label}\nmetric drop when masked (test)")
    for ax in flat[len(drops):]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_png(fig, output)


def plot_avl(avl_csv: str | Path, output: str | Path) -> Path:
    """K_v and the per-modality gradient norms over the training steps of one run."""
    steps = read_avl_csv(avl_csv)
    fig, (k_ax, grad_ax) = pyplot().subplots(1, 2, figsize=(11, 4))
    plot_k_v(k_ax, steps)
    plot_grad_norms(grad_ax, steps)
    starts = [step for i, step in enumerate(steps["step"]) if i and steps["epoch"][i] != steps["epoch"][i - 1]]
    for ax in (k_ax, grad_ax):
        for step in starts:  # epoch boundaries
            ax.axvline(step, color="0.6", lw=0.9, ls=":", zorder=0)
    fig.suptitle(Path(avl_csv).name.removesuffix(AVL_SUFFIX))
    fig.tight_layout()
    return save_png(fig, output)


def plot_runs(paths: Iterable[str | Path], out_dir: str | Path, metric: str = "ndcg@10") -> list[Path]:
    """Every figure the runs under ``paths`` support, written to ``out_dir``."""
    run_dirs, avl_csvs = find_runs(paths)
    out_dir = Path(out_dir)
    runs = training_runs(run_dirs)
    figures = []
    if runs:
        figures.append(plot_training_curves(runs, out_dir / "training_curves.png", metric))
    drops = {label: drop for label, scalars in runs.items() if (drop := utilisation_drops(scalars))}
    if drops:
        figures.append(plot_utilisation_runs(drops, out_dir / "utilisation.png"))
    for avl_csv in avl_csvs:
        figures.append(plot_avl(avl_csv, out_dir / f"avl-{avl_csv.name.removesuffix(AVL_SUFFIX)}.png"))
    return figures


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="folders (e.g. log_tensorboard saved) or files")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--metric", default="ndcg@10", help="valid metric of the training curves")
    args = parser.parse_args(argv)
    try:
        figures = plot_runs(args.runs, args.out, args.metric)
    except FileNotFoundError as error:
        parser.exit(2, f"error: {error}\n")
    if not figures:
        parser.exit(1, f"error: no tensorboard runs or AVL CSVs under {' '.join(args.runs)}\n")
    for figure in figures:
        print(figure)
    return figures


if __name__ == "__main__":
    main()
