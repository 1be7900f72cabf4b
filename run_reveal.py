"""Train and evaluate REVEAL models and RecBole baselines.

    python run_reveal.py --model=SASRecREVEAL --dataset=scientific
    python run_reveal.py --model=SASRec,SASRecREVEAL --dataset=scientific   # side-by-side table
    python run_reveal.py --model=SASRecREVEAL --nproc=2   # 2-process DDP (gloo on CPU, NCCL with --gpu_id=0,1)
    python run_reveal.py --model="SASRec,SASRecREVEAL[avl=False],SASRecREVEAL" --seeds=2020,2021,2022
    python run_reveal.py --model=SASRecREVEAL --dataset=synthetic --fve_rounds=2   # FVE loop (README "FVE")
    python run_reveal.py --model=peers --dataset=scientific --seeds=2020,2021,2022   # README "Multimodal peers"

Unknown ``--key=value`` arguments are RecBole config overrides (e.g. ``--epochs=50``).
"""
import argparse
import re
import sys

import yaml

from reveal_recbole.comparison import compare, expand_suites, seed_list
from reveal_recbole.config import Config
from reveal_recbole.errors import UserInputError
from reveal_recbole.fve.loop import run_fve
from reveal_recbole.quick_start import run
from reveal_recbole.recbole_seam import quiet_third_party_warnings


def main(argv=None) -> None:
    quiet_third_party_warnings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", "-m", default="SASRecREVEAL",
                        help="model name, or a comma-separated list to compare; a suite (peers) stands for its list")
    parser.add_argument("--dataset", "-d", default="scientific", help="dataset name")
    parser.add_argument("--config_files", default=None, help="space-separated yaml config files")
    parser.add_argument("--seeds", type=seed_list, default=None,
                        help="comma-separated seeds: compare runs every model once per seed")
    parser.add_argument("--output_dir", default="results", help="where --model=A,B writes its comparison table")
    parser.add_argument("--resume_compare", default=None,
                        help="a -runs.json of an interrupted comparison: run only the (model, seed) pairs it lacks")
    parser.add_argument("--nproc", type=int, default=1, help="processes for DDP training of one model")
    parser.add_argument("--world_size", type=int, default=-1, help="processes over all nodes (default: nproc)")
    parser.add_argument("--ip", default="localhost", help="address of the rank-0 node")
    parser.add_argument("--port", default="5678", help="free port on the rank-0 node")
    parser.add_argument("--group_offset", type=int, default=0, help="global rank of this node's first process")
    args, _ = parser.parse_known_args(argv)

    config_files = args.config_files.split() if args.config_files else None
    models = expand_suites([m.strip() for m in re.split(r",(?![^\[]*\])", args.model) if m.strip()])
    try:
        single = len(models) == 1 and args.seeds is None and "[" not in models[0]
        if not single and (args.nproc > 1 or args.world_size > 0):
            parser.error("--nproc/--world_size train one model: give one --model and no --seeds")
        if single and (Config(models[0], args.dataset, config_files)["fve_rounds"] or 0) > 0:
            run_fve(model=models[0], dataset=args.dataset, config_file_list=config_files)
        elif single:
            run(models[0], args.dataset, config_files, nproc=args.nproc, world_size=args.world_size,
                ip=args.ip, port=args.port, group_offset=args.group_offset)
        else:
            compare(models, args.dataset, args.seeds, config_file_list=config_files, output_dir=args.output_dir,
                    resume=args.resume_compare)
    except (UserInputError, yaml.YAMLError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
