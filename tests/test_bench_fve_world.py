"""benchmarks/bench_fve_world.py's core: the arms on the tiny FVE set with stand-in networks, and its table."""
from pathlib import Path

import numpy as np
import pytest
from pytest import approx

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
        assert row["buckets"]["all"]["ndcg@10"] == approx(row["test_ndcg@10"], abs=5e-5)  # RecBole rounds to 4

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


def test_a_cold_share_gives_every_arm_the_same_cold_split_and_per_bucket_tables(fve_config, tmp_path):  # noqa: F811
    module = bench()
    data_root = Path(fve_config["data_path"])
    tokens = item_tokens(data_root)
    regions = ["item_id\tx0\ty0\tx1\ty1\twidth\theight"] + [f"{t}\t4\t4\t8\t8\t8\t8" for t in tokens]
    (data_root / DATASET / f"{DATASET}.regions.tsv").write_text("\n".join(regions) + "\n")
    config = {k: v for k, v in fve_config.items() if k not in ("seed", "data_path", "checkpoint_dir")}
    reports = module.run_arms(7, data_root, tiny_encoder(), tmp_path / "bench", 1,
                              {**config, "cold_items": "features", "fve_keep_alpha": 1.0,
                               "strict_feature_items": False},  # the tiny set's .item lacks some items
                              dataset=DATASET,
                              cold_share=0.2, region_items=10)

    world, seed_world = data_root / DATASET, tmp_path / "bench" / "data" / DATASET
    inter = (world / f"{DATASET}.inter").read_text()
    held, split = module.held_out_inter(inter, 0.2, 7, 2)
    assert (seed_world / f"{DATASET}.inter").read_text() == held and split.dropped > 0
    cold = set(split.cold_items)
    reviewed = {line.split("\t")[0] for line in (world / f"{DATASET}.reviews").read_text().splitlines()[1:]}
    kept = {line.split("\t")[0] for line in (seed_world / f"{DATASET}.reviews").read_text().splitlines()[1:]}
    assert cold & reviewed and kept == reviewed - cold  # the held-out items lose their reviews, no other item does
    assert len((seed_world / f"{DATASET}.regions.tsv").read_text().splitlines()) == 1 + 10
    assert (seed_world / "images").is_symlink()  # the rest is the world's own files

    rows = [row for arm in module.ARMS for row in reports[arm]]
    assert {tuple(row["buckets"]) for row in rows} == {module.BUCKETS}
    assert rows[0]["buckets"]["cold"]["n"] > 0
    for bucket in module.BUCKETS:  # one split: the same targets in every bucket, for every arm and round
        assert len({row["buckets"][bucket]["n"] for row in rows}) == 1
    for row in rows:  # the bucket "all" is RecBole's test NDCG@10
        assert row["buckets"]["all"]["ndcg@10"] == approx(row["test_ndcg@10"], abs=5e-5)

    results = {7: reports}
    table = module.bucket_table(results, "recall@20").splitlines()
    assert table[0] == "| arm | round | all | warm | cold | head | torso | tail |"
    assert len(table) == 2 + 1 + 2 + 2 + 2 + 1 and table[-1].startswith("| test targets | - |")
    fve = reports["FVE"][-1]["buckets"]["cold"]["ndcg@10"]
    assert module.versus_buckets(results)["no prompt"]["cold"]["per_seed"] == [
        fve - reports["no prompt"][-1]["buckets"]["cold"]["ndcg@10"]]


def test_combine_makes_one_report_from_two_runs(tmp_path):
    module = bench()
    row = {"round": 0, "kept_round": 0, "kept": False, "valid_ndcg@10": 0.1, "round_valid_ndcg@10": 0.1,
           "test_ndcg@10": 0.1, "image_drop": 0.0, "changed_prompts": 0, "attention": None,
           "extract_seconds": 1.0, "encoded": 10, "keep_test": None,
           "buckets": {b: {"n": 3, "ndcg@10": 0.1, "recall@20": 0.2} for b in module.BUCKETS}}
    paths = []
    for seed, score in ((1, 0.1), (2, 0.3)):
        arms = {arm: [{**row, "test_ndcg@10": score}] for arm in module.ARMS}
        report = {"rounds": 0, "world": [], "config": [], "prompt_template": "t", "cold_item_share": 0.2,
                  "dataset": "synthetic_clutter_sparse", "cold_items": "features", "seconds": 60.0,
                  "results": {str(seed): arms}}
        paths.append(tmp_path / f"{seed}.json")
        paths[-1].write_text(module.json.dumps(report))
    report = module.main(["--combine", *map(str, paths), "--results", str(tmp_path / "out")])
    assert report["seeds"] == [1, 2] and report["seconds"] == 120.0
    text = next((tmp_path / "out").glob("fve-world-*.md")).read_text()
    assert text.startswith("Model: SASRecREVEAL; world: synthetic_clutter_sparse; cold_item_share 0.2 "
                           "(cold_items: features); seeds 1, 2")
    assert "| FVE | 0 | 0.1000 ± 0.0000 |" in text and "| test targets | - | 3 ± 0 |" in text


def test_arms_left_out_have_no_rows_and_no_comparison(fve_config, tmp_path):  # noqa: F811
    """--arms FVE "no prompt": the peer rows alone, the tables and differences without the skipped arms."""
    module = bench()
    data_root = Path(fve_config["data_path"])
    config = {k: v for k, v in fve_config.items() if k not in ("seed", "data_path", "checkpoint_dir")}
    reports = module.run_arms(7, data_root, tiny_encoder(), tmp_path / "bench", 1, {**config, "fve_keep_alpha": 1.0},
                              dataset=DATASET, arms=("FVE", "no prompt"))
    assert [len(reports[arm]) for arm in module.ARMS] == [1, 2, 0, 0]
    assert not (tmp_path / "bench" / "control-7").exists() and not (tmp_path / "bench" / "every-7").exists()
    results = {7: reports}
    assert set(module.versus(results)) == {"no prompt"}
    assert "control" not in module.table(results) and "every item" not in module.table(results)
    with pytest.raises(SystemExit, match="FVE included"):
        module.run_arms(7, data_root, tiny_encoder(), tmp_path / "x", 1, config, dataset=DATASET, arms=("no prompt",))


def test_runs_started_in_the_same_second_get_their_own_folder_and_report_name(tmp_path):
    module = bench()
    first, second = (module.claim_work_folder(tmp_path, "20261203-085854") for _ in range(2))
    assert first == (tmp_path / "20261203-085854", "20261203-085854")
    assert second == (tmp_path / "20261203-085854-2", "20261203-085854-2") and second[0].is_dir()
