"""Train-epoch and full-ranking eval time of model variants on one dataset, as ratios to a baseline.

All variants are built once, then timed interleaved (A, B, C, A, B, C, ...) so machine noise
hits them alike; the table gives min and median seconds over the repeats and the ratios of
each variant's min/median to the baseline's.

    python benchmarks/bench_training_cost.py --suite encoder   # SASRecREVEAL (AVL off) vs SASRec
    python benchmarks/bench_training_cost.py --suite avl       # AVL on / off / naive / interval
    python benchmarks/bench_training_cost.py --suite avl-exact # exact AVL (reveal, agm) vs off only
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

import reveal_recbole.trainer.avl as avl_module
from reveal_recbole.config import Config
from reveal_recbole.pipeline import prepare_run

# utilisation_per_epoch off: its masked evaluations are a diagnostic, not the cost measured here
COMMON = {"state": "ERROR", "show_progress": False, "checkpoint_dir": "saved/bench", "diagnostics_figure": False,
          "utilisation_per_epoch": False}

AVL_OFF = ("SASRecREVEAL AVL off", "SASRecREVEAL", {"avl": False})
AVL_EXACT = ("AVL on, exact (every step)", "SASRecREVEAL", {"avl": True, "avl_interval": 1})
AGM_EXACT = ("AVL agm, exact (every step)", "SASRecREVEAL", {"avl": True, "avl_variant": "agm", "avl_interval": 1})

SUITES = {
    "encoder": [
        ("SASRec", "SASRec", {}),
        ("SASRecREVEAL (AVL off)", "SASRecREVEAL", {"avl": False}),
    ],
    "avl": [
        AVL_OFF,
        AVL_EXACT,
        AGM_EXACT,
        ("AVL naive 3-pass (train-mode passes)", "SASRecREVEAL", {"avl": True, "avl_interval": 1, "_naive": True}),
        ("AVL on, avl_interval=2", "SASRecREVEAL", {"avl": True, "avl_interval": 2}),
        ("AVL on, avl_interval=4", "SASRecREVEAL", {"avl": True, "avl_interval": 4}),
    ],
    "avl-exact": [AVL_OFF, AVL_EXACT, AGM_EXACT],  # the cost target alone: exact AVL (both variants) against off
}


def naive_masked_losses(model, interaction, visual="image", text="text"):
    """The reference's way: two more forward passes in training mode (dropout on), no gradient."""
    encoder = model.item_embedding
    with torch.no_grad():
        with encoder.masking([text]):
            loss_v = avl_module.total_loss(model.calculate_loss(interaction)).float()
        with encoder.masking([visual]):
            loss_t = avl_module.total_loss(model.calculate_loss(interaction)).float()
    return loss_v, loss_t


def build(model_name: str, dataset: str, overrides: dict):
    run = prepare_run(Config(model=model_name, dataset=dataset, config_dict=COMMON | overrides))
    return run.trainer, run.train_data, run.valid_data


def time_variant(trainer, train_data, valid_data, epoch: int, naive: bool) -> tuple[float, float]:
    patch = _patched_masked_losses() if naive else nullcontext()
    with patch:
        start = time.perf_counter()
        trainer._train_epoch(train_data, epoch)
        train_s = time.perf_counter() - start
    start = time.perf_counter()
    trainer._valid_epoch(valid_data)
    return train_s, time.perf_counter() - start


class _patched_masked_losses:
    def __enter__(self):
        self.original = avl_module.masked_losses
        avl_module.masked_losses = naive_masked_losses

    def __exit__(self, *exc):
        avl_module.masked_losses = self.original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="encoder")
    parser.add_argument("--dataset", default="scientific")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    variants = []
    for label, model_name, overrides in SUITES[args.suite]:
        overrides = dict(overrides)
        naive = overrides.pop("_naive", False)
        variants.append((label, naive, *build(model_name, args.dataset, overrides)))
    times = {label: ([], []) for label, *_ in variants}
    for epoch in range(args.repeats + 1):  # epoch 0 warms up and is not counted
        for label, naive, trainer, train_data, valid_data in variants:
            train_s, eval_s = time_variant(trainer, train_data, valid_data, epoch, naive)
            if epoch > 0:
                times[label][0].append(train_s)
                times[label][1].append(eval_s)

    base_train, base_eval = times[variants[0][0]]
    print(f"suite={args.suite} dataset={args.dataset} repeats={args.repeats} torch_threads={torch.get_num_threads()}")
    print("| variant | train s/epoch min | median | ratio min | ratio median "
          "| eval s min | median | ratio min | ratio median |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, (train, evals) in times.items():
        cells = [
            min(train), statistics.median(train), min(train) / min(base_train),
            statistics.median(train) / statistics.median(base_train),
            min(evals), statistics.median(evals), min(evals) / min(base_eval),
            statistics.median(evals) / statistics.median(base_eval),
        ]
        formatted = (f"{c:.2f}" if i % 4 < 2 else f"{c:.3f}x" for i, c in enumerate(cells))
        print(f"| {label} | " + " | ".join(formatted) + " |")


if __name__ == "__main__":
    main()
