"""Does the model see? Visual utilisation and AVL figures.

Visual utilisation (METHOD.md): evaluate the same split three times, with all inputs, with
the image input masked and with the text input masked; the metric drop when a modality is
masked says how much the model relies on it. On a large split (users x items over
``UTILISATION_ALL_USERS_SCORES``) the three passes run on a seeded sample of users
(``utilisation_users``), the same users each time, so the drop stays paired.

    python -m reveal_recbole.diagnostics saved/SASRecREVEAL-<time>.pth --split=valid --figure=util.png
"""
from __future__ import annotations

import argparse
import csv
from logging import getLogger
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from reveal_recbole.atomic import atomic_write_bytes
from reveal_recbole.errors import ConfigError

UTILISATION_METRICS = ("ndcg@10", "recall@20")
# utilisation_users: ~ evaluates every user while users x items (the scores of one pass) is at most this
# (Amazon Sports, 35,598 x 18,357 = 6.5e8, stays whole), else a seeded sample of UTILISATION_SAMPLE users
# (NDCG@10's paired drop then has a standard error of about 0.002 where per-user drops spread by 0.2)
UTILISATION_ALL_USERS_SCORES = 10**9
UTILISATION_SAMPLE = 10_000
UTILISATION_CSV_SUFFIX = "-utilisation.csv"  # per-epoch validation drops, next to the checkpoint (REVEALTrainer)


def utilisation_users(config, eval_data) -> np.ndarray | None:
    """The users utilisation passes evaluate: None for all, else a sample drawn from ``config["seed"]``.

    ``utilisation_users``: ~ = all users while users x items <= ``UTILISATION_ALL_USERS_SCORES``,
    else ``UTILISATION_SAMPLE`` users; a number N = N users (all when the split has no more).
    """
    dataset = eval_data._dataset
    users = np.unique(dataset.inter_feat[dataset.uid_field].numpy())
    wanted = config["utilisation_users"]
    if wanted is None:
        if len(users) * dataset.item_num <= UTILISATION_ALL_USERS_SCORES:
            return None
        wanted = UTILISATION_SAMPLE
    if not isinstance(wanted, int) or wanted < 1:
        raise ConfigError(f"utilisation_users must be a positive number of users or ~, got {wanted!r}")
    if wanted >= len(users):
        return None
    getLogger().info(
        f"visual utilisation on a seeded sample of {wanted:,} of {len(users):,} users "
        f"({len(users):,} users x {dataset.item_num:,} items; utilisation_users: {config['utilisation_users']})"
    )
    return np.sort(np.random.default_rng(config["seed"]).choice(users, wanted, replace=False))


def users_loader(eval_data, users: np.ndarray):
    """``eval_data``'s loader class over ``users``' rows of its split only (same config and sampler)."""
    dataset = eval_data._dataset
    rows = np.isin(dataset.inter_feat[dataset.uid_field].numpy(), users)
    subset = dataset.copy(dataset.inter_feat[torch.from_numpy(rows)])
    return type(eval_data)(eval_data.config, subset, eval_data._sampler, shuffle=False)


def visual_utilisation(trainer, eval_data, modalities=("image", "text"), metrics=UTILISATION_METRICS,
                       full=None) -> dict:
    """Metrics with all inputs, with each modality masked, and the drop (full - masked) per metric.

    The model is evaluated as it is (no checkpoint reload), so a validation epoch can call it with
    its own unmasked result as ``full`` and pay one evaluation per masked modality. On a user
    sample (:func:`utilisation_users`, which says so in the log) ``full`` is not used: the sample is
    evaluated unmasked too, so that every pass ranks for the same users.
    """
    encoder = trainer.model.item_embedding
    users = utilisation_users(trainer.config, eval_data)
    if users is not None:
        eval_data, full = users_loader(eval_data, users), None
    if full is None:
        full = trainer.evaluate(eval_data, load_best_model=False)
    report = {"full": {m: float(full[m]) for m in metrics}, "masked": {}, "drop": {}}
    for modality in modalities:
        if modality not in encoder.modalities:
            continue
        with encoder.masking([modality]):
            masked = trainer.evaluate(eval_data, load_best_model=False)
        report["masked"][modality] = {m: float(masked[m]) for m in metrics}
        report["drop"][modality] = {m: float(full[m]) - float(masked[m]) for m in metrics}
    return report


def utilisation_row(epoch: int, report: dict) -> dict[str, float]:
    """One epoch of a :func:`visual_utilisation` report as a flat CSV row."""
    row = {"epoch": epoch, **report["full"]}
    for modality in report["masked"]:
        row.update({f"{modality}_masked_{m}": v for m, v in report["masked"][modality].items()})
        row.update({f"{modality}_drop_{m}": v for m, v in report["drop"][modality].items()})
    return row


def append_csv_row(path: str | Path, row: dict) -> None:
    """Append ``row`` to a CSV file, writing the header first when the file is new."""
    new_file = not Path(path).exists()
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new_file:
            writer.writeheader()
        writer.writerow(row)


def read_csv_columns(path: str | Path, what: str) -> dict[str, list[float]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no {what} rows")
    return {key: [float(row[key]) for row in rows] for key in rows[0]}


def read_avl_csv(path: str | Path) -> dict[str, list[float]]:
    return read_csv_columns(path, "AVL")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, output: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    pyplot().close(fig)
    atomic_write_bytes(output, buffer.getvalue())
    return Path(output)


def plot_k_v(ax, steps: dict[str, list[float]]) -> None:
    """K_v per step, and K_t where the run scaled text gradients too (``avl_variant: agm``)."""
    ax.plot(steps["step"], steps["k_v"], lw=0.8, label="K_v (image)")
    if any(k != 1.0 for k in steps.get("k_t", ())):
        ax.plot(steps["step"], steps["k_t"], lw=0.8, label="K_t (text)")
        ax.legend()
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set(title="AVL gradient weights", xlabel="training step", ylabel="weight")


def plot_grad_norms(ax, steps: dict[str, list[float]]) -> None:
    ax.plot(steps["step"], steps["grad_norm_image"], lw=0.8, label="image branch")
    ax.plot(steps["step"], steps["grad_norm_text"], lw=0.8, label="text branch")
    ax.set(title="gradient norm per modality", xlabel="training step", ylabel="L2 norm")
    ax.legend()


def plot_utilisation(
    ax, drop: dict[str, dict[str, float]], title: str = "metric drop when a modality is masked"
) -> None:
    """Grouped bars: per metric, the drop (full - masked) for each masked modality."""
    modalities = list(drop)
    metrics = list(dict.fromkeys(m for values in drop.values() for m in values))
    width = 0.8 / max(len(modalities), 1)
    for i, modality in enumerate(modalities):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [drop[modality].get(m, float("nan")) for m in metrics], width, label=f"{modality} masked")
    ax.set_xticks([j + width * (len(modalities) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set(title=title, ylabel="full - masked")
    ax.legend()


def plot_utilisation_epochs(ax, epochs: dict[str, list[float]], metric: str = "ndcg@10") -> None:
    """The validation drop per masked modality over epochs: where the image line nears 0, the IDs took over."""
    for column in epochs:
        if column.endswith(f"_drop_{metric}"):
            ax.plot(epochs["epoch"], epochs[column], marker=".", label=f"{column.split('_drop_')[0]} masked")
    ax.axhline(0.0, color="grey", ls="--", lw=0.8)
    ax.set(title=f"valid {metric} drop when masked, per epoch", xlabel="epoch", ylabel="full - masked")
    ax.legend()


def plot_diagnostics(avl_csv: Optional[str | Path], utilisation: Optional[dict], output: str | Path,
                     utilisation_csv: Optional[str | Path] = None) -> Path:
    """One PNG: K_v over steps, per-modality gradient norms, the utilisation bars and the per-epoch drops."""
    panels = (2 if avl_csv else 0) + (1 if utilisation else 0) + (1 if utilisation_csv else 0)
    if panels == 0:
        raise ValueError("nothing to plot: give an AVL CSV, a utilisation report or a per-epoch utilisation CSV")
    fig, axes = pyplot().subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
    axes = list(axes[0])
    if avl_csv:
        steps = read_avl_csv(avl_csv)
        plot_k_v(axes.pop(0), steps)
        plot_grad_norms(axes.pop(0), steps)
    if utilisation:
        plot_utilisation(axes.pop(0), utilisation["drop"])
    if utilisation_csv:
        plot_utilisation_epochs(axes.pop(0), read_csv_columns(utilisation_csv, "utilisation"))
    fig.tight_layout()
    return save_png(fig, output)


def existing(path: Optional[str | Path]) -> Optional[Path]:
    """``path`` if it names a file (a run writes its CSVs only when the feature is on), else None."""
    return Path(path) if path and Path(path).is_file() else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_file", help="a checkpoint saved by run_reveal (saved/<Model>-<time>.pth)")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--figure", default=None, help="PNG path; default: next to the checkpoint")
    args = parser.parse_args(argv)

    from reveal_recbole.pipeline import load_run

    run = load_run(args.model_file)
    report = visual_utilisation(run.trainer, run.valid_data if args.split == "valid" else run.test_data)
    print(f"{args.split} utilisation: {report}")
    avl_csv, epochs_csv = (existing(Path(args.model_file).with_name(Path(args.model_file).stem + suffix))
                           for suffix in ("-avl.csv", UTILISATION_CSV_SUFFIX))
    figure = args.figure or Path(args.model_file).with_suffix(".diagnostics.png")
    print(f"figure: {plot_diagnostics(avl_csv, report, figure, epochs_csv)}")


if __name__ == "__main__":
    main()
