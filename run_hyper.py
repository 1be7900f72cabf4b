"""Hyperparameter search for REVEAL models and RecBole baselines, as RecBole's ``run_hyper.py``.

    python run_hyper.py --model=SASRecREVEAL --dataset=scientific \\
        --params_file=properties/hyper/SASRecREVEAL-grid.hyper --algo=exhaustive --output_file=hyper.result
    python run_hyper.py --config_files=tune.yaml --params_file=properties/hyper/SASRecREVEAL.hyper \\
        --algo=bayes --max_evals=30

RecBole's own ``HyperTuning`` (hyperopt) drives the search; each trial is
``reveal_recbole.quick_start.objective_function``, so our Config, datasets and trainers (AVL
included) are used and any RecBole model name works too. The model and dataset come from the
fixed config files or from ``--model=... --dataset=...``; like every other unknown
``--key=value`` they are RecBole command-line config overrides, fixed for all trials.

Params files use RecBole's format, one parameter per line: ``name choice [a,b]``,
``name uniform low,high``, ``name quniform low,high,q``, ``name loguniform low,high`` (bounds of
the log). ``--algo=exhaustive`` tries every combination and accepts only ``choice`` lines.
``--seeds=2020,2021,2022`` scores each trial by its mean over the seeds (3x the time, far less noise on
small sets).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from recbole.trainer import HyperTuning

from reveal_recbole.atomic import atomic_target
from reveal_recbole.comparison import seed_list
from reveal_recbole.quick_start import objective_function, seed_averaged
from reveal_recbole.recbole_seam import numpy_str_alias, quiet_third_party_warnings


class REVEALHyperTuning(HyperTuning):
    """RecBole's HyperTuning, writing ``output_file`` after every trial (atomically: a search
    killed after trial k keeps k trials' results), with its ``--display_file`` plot working
    under numpy >= 1.24."""

    def __init__(self, *args, output_file: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_file = output_file

    def trial(self, params):
        status = super().trial(params)
        if self.output_file:
            self.export_result(self.output_file)
        return status

    def export_result(self, output_file=None) -> None:
        with atomic_target(output_file) as temporary:
            super().export_result(temporary)

    def plot_hyper(self) -> None:
        with numpy_str_alias():
            super().plot_hyper()


def main(argv: Optional[Sequence[str]] = None) -> HyperTuning:
    quiet_third_party_warnings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_files", type=str, default=None, help="space-separated fixed config files")
    parser.add_argument("--params_file", type=str, required=True, help="the search space (RecBole's format)")
    parser.add_argument("--output_file", type=str, default="hyper_example.result", help="every trial's results")
    parser.add_argument("--display_file", type=str, default=None, help="an HTML plot of the trials (plotly)")
    parser.add_argument("--tool", type=str.lower, default="hyperopt", choices=["hyperopt"],
                        help="tuning library; RecBole's Ray Tune path is not supported here")
    parser.add_argument("--algo", default="exhaustive", choices=["exhaustive", "random", "bayes"],
                        help="hyperopt search: every combination, random draws, or TPE")
    parser.add_argument("--max_evals", type=int, default=100, help="trials for random/bayes (exhaustive: all)")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without progress")
    parser.add_argument("--seeds", type=seed_list, default=None,
                        help="comma-separated seeds: each trial runs once per seed and is scored by the mean "
                             "(valid and test results are the means); default: one run at the config's seed")
    args, _ = parser.parse_known_args(argv)

    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    hp = REVEALHyperTuning(
        seed_averaged(objective_function, args.seeds) if args.seeds else objective_function,
        algo=args.algo,
        early_stop=args.early_stop,
        max_evals=args.max_evals,
        params_file=args.params_file,
        fixed_config_file_list=config_file_list,
        display_file=args.display_file,
        output_file=args.output_file,
    )
    hp.run()
    print("best params: ", hp.best_params)
    print("best result: ")
    print(hp.params2result[hp.params2str(hp.best_params)])
    return hp


if __name__ == "__main__":
    main()
