"""benchmarks/bench_fve_world.py's core: the arms on the tiny FVE set with stand-in networks, and its table."""
from pathlib import Path

import numpy as np

from conftest import load_script
from test_fve_aligned import tiny_encoder
from test_fve_loop import DATASET, fve_config, item_tokens  # noqa: F401 - the tiny FVE set (a fixture)


def bench():
    return load_script("benchmarks/bench_fve_world")


def test_the_arms_share_round_0_and_report_every_round(fve_config, tmp_path):  # noqa: F811
    module = bench()
    data_root = Path(fve_config["data_path"])
    tokens = item_tokens(data_root)
    regions = ["item_id\tx0\ty0\tx1\ty1\twidth\theight"] + [f"{t}\t4\t4\t8\t8\t8\t8" for t in tokens]
    (data_root / DATASET / f"{DATASET}.regions.tsv").write_text("\n".join(regions) + "\n")
    config = {k: v for k, v in fve_config.items() if k not in ("seed", "data_path", "checkpoint_dir")}
    reports = module.run_arms(7, data_root, tiny_encoder(), tmp_path / "bench", 1, {**config, "fve_keep_alpha": 1.0},
                              dataset=DATASET)
    assert [len(reports[arm]) for arm in module.ARMS] == [1, 2, 2, 2]
    fve, control, plain = reports["FVE"], reports["control"], reports["no prompt"]
    assert control[0] is fve[0] and reports["every item"][0] is fve[0]  # they start from FVE's round 0
    assert reports["every item"][1]["changed_prompts"] > fve[1]["changed_prompts"]  # every observed item
    assert fve[1]["changed_prompts"] == control[1]["changed_prompts"] > 0  # the same number rewritten
    assert plain[0]["attention"]["mean"] == plain[0]["attention"]["uniform"] == 0.25  # uniform pooling
    for row in (*fve, *control, *plain):
        assert 0 <= row["test_ndcg@10"] <= 1 and np.isfinite(row["image_drop"])

    results = {7: reports}
    table = module.table(results)
    assert len(table.splitlines()) == 2 + 1 + 2 + 2 + 2 and "| FVE | 1 |" in table and "| control | 1 |" in table
    cost = module.extraction(results)
    assert cost["round0_images"] == len(tokens) - 3 and cost["round1_images"] <= fve[1]["changed_prompts"]
    assert module.versus(results)["control"]["per_seed"] == [fve[1]["test_ndcg@10"] - control[1]["test_ndcg@10"]]


def test_cue_agreement_on_a_constructed_case():
    module = bench()
    hue = np.array([0.0, 10.0, 180.0, 190.0])
    shape = np.array(["star", "star", "circle", "square"])
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])  # items 0-1 and 2-3 look alike
    agreement = module.cue_agreement(features, hue, shape, k=1)
    assert agreement == {"shape": 0.5, "hue": 1.0, "both": 0.5}  # pairs share the hue; only 0-1 the shape
    assert module.cue_agreement(features, hue, shape, k=3)["hue"] == 1 / 3
