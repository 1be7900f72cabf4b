"""compare(): a baseline and its REVEAL version on one split, one table (.md and .csv), best marked."""
import csv
import logging
import sys
from pathlib import Path

import pytest
import torch

import reveal_recbole.comparison as comparison
import reveal_recbole.pipeline as pipeline
from reveal_recbole.comparison import compare
from reveal_recbole.errors import UserInputError
from reveal_recbole.quick_start import run_reveal

from conftest import REPORT_METRICS, assert_report_metrics, make_tiny_config

MODELS = ["SASRec", "SASRecREVEAL"]


@pytest.fixture(scope="module")
def compared(tiny_source, tmp_path_factory):
    """Run compare once for the module, recording the split each model was given."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(root)
        monkeypatch.setattr(sys, "argv", sys.argv[:1])
        yield run_compare(make_tiny_config(tiny_source, root / "saved"), root / "results", monkeypatch)


def run_compare(tiny_config, output_dir, monkeypatch):
    splits = {}
    original = pipeline.data_preparation

    def recording_data_preparation(config, dataset):
        train_data, valid_data, test_data = original(config, dataset)
        uid, iid = dataset.uid_field, dataset.iid_field
        splits[config["model"]] = {
            name: (data._dataset.inter_feat[uid].clone(), data._dataset.inter_feat[iid].clone())
            for name, data in (("train", train_data), ("valid", valid_data), ("test", test_data))
        }
        splits[config["model"]]["test_users"] = len(torch.unique(test_data._dataset.inter_feat[uid]))
        splits[config["model"]]["test_size"] = test_data.sample_size
        return train_data, valid_data, test_data

    monkeypatch.setattr(pipeline, "data_preparation", recording_data_preparation)
    results, rows = compare(MODELS, "scientific", config_dict=tiny_config, output_dir=str(output_dir))
    return results, rows, output_dir, splits


def test_compare_writes_one_table_of_both_models(compared):
    results, rows, output_dir, _ = compared
    assert list(results) == MODELS
    for runs in results.values():
        assert len(runs) == 1
        assert_report_metrics(runs[0]["test_result"])
        assert runs[0]["train_seconds"] > 0 and runs[0]["epochs"] == 1

    md_files = [f for f in output_dir.glob("*.md") if not f.stem.endswith("-targets")]
    csv_files = [f for f in output_dir.glob("*.csv") if not f.stem.endswith(("-runs", "-targets"))]
    assert len(md_files) == 1 and len(csv_files) == 1
    assert md_files[0].stem == csv_files[0].stem and "scientific" in md_files[0].stem
    with open(output_dir / f"{csv_files[0].stem}-runs.csv", newline="", encoding="utf-8") as handle:
        assert [row[:2] for row in list(csv.reader(handle))[1:]] == [[m, "2020"] for m in MODELS]

    with open(csv_files[0], newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert table == rows
    header, body = table[0], table[1:]
    assert header[: 2 + len(REPORT_METRICS)] == ["model", "seeds", *REPORT_METRICS]
    assert [row[1] for row in body] == ["1", "1"]
    assert [row[0] for row in body] == MODELS

    markdown = md_files[0].read_text(encoding="utf-8").splitlines()
    assert markdown[0] == "| " + " | ".join(header) + " |"
    assert [line.split("|")[1].strip() for line in markdown[2:]] == MODELS
    assert len(markdown) == 2 + len(MODELS)

    for column, metric in enumerate(REPORT_METRICS, start=2):
        means = [float(row[column].rstrip("*").split(" ± ")[0]) for row in body]
        for row, model in zip(body, MODELS):
            # one seed: the table shows the run's own value (std 0), marked when it is the column's best
            mean, std = row[column].rstrip("*").split(" ± ")
            assert float(mean) == pytest.approx(float(results[model][0]["test_result"][metric]), abs=5e-5)
            assert float(std) == 0.0
            assert row[column].endswith("*") == (float(mean) == max(means)), (metric, row)
        assert any(row[column].endswith("*") for row in body)

    # the best validation NDCG@10 each run reached is recorded and tabled beside the test metrics
    valid = header.index("valid NDCG@10")
    (runs_file,) = output_dir.glob("*-runs.json")
    for row, record in zip(body, comparison.read_run_records(runs_file)):
        assert float(row[valid]) == pytest.approx(record["best_valid_result"]["ndcg@10"], abs=5e-5)
        assert float(row[valid]) == pytest.approx(float(results[row[0]][0]["best_valid_result"]["ndcg@10"]), abs=5e-5)


def test_compare_gives_every_model_the_same_split(compared):
    _, _, _, splits = compared
    baseline, reveal = (splits[m] for m in MODELS)
    assert baseline["test_users"] == reveal["test_users"] == baseline["test_size"] == reveal["test_size"] > 0
    for part in ("train", "valid", "test"):
        for left, right in zip(baseline[part], reveal[part]):
            assert torch.equal(left, right), part


def fake_run(ndcg10: float, recall20: float) -> dict:
    test = {"recall@10": recall20 / 2, "recall@20": recall20, "ndcg@10": ndcg10, "ndcg@20": ndcg10 * 1.2}
    return {"test_result": test, "train_seconds": 10.0, "epochs": 5,
            "utilisation": {"drop": {"image": {"ndcg@10": 0.01}, "text": {"ndcg@10": 0.02}}}}


def test_summary_over_seeds_marks_best_and_gain_over_backbone():
    results = {
        "SASRec": [fake_run(0.070, 0.19), fake_run(0.074, 0.20)],
        "SASRecREVEAL[avl=False]": [fake_run(0.080, 0.21), fake_run(0.084, 0.23)],
        "GRU4Rec": [fake_run(0.050, 0.14), fake_run(0.052, 0.15)],
    }
    summary = comparison.summarise(results)
    assert summary[0]["ndcg@10"] == pytest.approx(0.072)
    assert summary[0]["ndcg@10_std"] == pytest.approx(0.004 / 2 ** 0.5)
    assert summary[1]["s_per_epoch"] == pytest.approx(2.0)
    rows = comparison.comparison_table(summary)
    header, body = rows[0], rows[1:]
    ndcg = header.index("ndcg@10")
    assert [row[ndcg].endswith("*") for row in body] == [False, True, False]
    gain = body[1][header.index("NDCG@10 vs backbone")]
    assert gain == f"{0.082 / 0.072 - 1:+.1%}"
    assert body[0][header.index("NDCG@10 vs backbone")] == ""  # a baseline has no backbone
    assert body[2][header.index("image-masked drop NDCG@10")] == "0.0100"


def test_valid_column_is_the_mean_best_valid_and_blank_for_runs_recorded_without_it():
    """Rows are chosen by validation, never by test: the table carries each row's mean best-valid NDCG@10;
    a runs file written before it was recorded gives a blank cell, not a mean of the runs that have it."""
    with_valid = [fake_run(0.07, 0.2) | {"best_valid_result": {"ndcg@10": v}} for v in (0.080, 0.090)]
    summary = comparison.summarise({"SASRec": with_valid, "GRU4Rec": [with_valid[0], fake_run(0.05, 0.1)]})
    assert summary[0]["valid_ndcg@10"] == pytest.approx(0.085)
    assert summary[1]["valid_ndcg@10"] is None
    rows = comparison.comparison_table(summary)
    column = rows[0].index("valid NDCG@10")
    assert [row[column] for row in rows[1:]] == ["0.0850", ""]


@pytest.mark.parametrize(
    "spec, expected",
    [("SASRec", ("SASRec", {})),
     ("SASRecREVEAL[avl=False, fusion=gated]", ("SASRecREVEAL", {"avl": False, "fusion": "gated"})),
     ("NARMREVEAL[avl_alpha=0.5]", ("NARMREVEAL", {"avl_alpha": 0.5}))],
)
def test_parse_model_spec(spec, expected):
    assert comparison.parse_model_spec(spec) == expected


@pytest.mark.parametrize("spec", ["SASRec[avl]", "SAS Rec", "SASRec[=1]"])
def test_parse_model_spec_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="spec"):
        comparison.parse_model_spec(spec)


def test_interrupted_compare_resumes_without_rerunning_finished_runs(tmp_path, monkeypatch):
    """Each finished run is on disk at once; a resumed comparison runs only the missing pairs."""
    calls = []

    def stub_run(model, dataset, config_file_list, settings, saved=True):
        calls.append((model, settings["seed"]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the machine goes away during the third run
        run = fake_run(0.07 + settings["seed"] % 10 / 1000 + (0.01 if "REVEAL" in model else 0), 0.2)
        return run | {"seed": settings["seed"], "utilisation": {"drop": {"image": {"ndcg@10": 0.01}}}}

    monkeypatch.setattr(comparison, "run_reveal", stub_run)
    with pytest.raises(KeyboardInterrupt):
        compare(MODELS, "scientific", seeds=[1, 2], output_dir=str(tmp_path))
    (runs_file,) = tmp_path.glob("*-runs.json")
    assert [(r["spec"], r["seed"]) for r in comparison.read_run_records(runs_file)] == [("SASRec", 1), ("SASRec", 2)]

    calls.clear()
    results, rows = compare(MODELS, "scientific", seeds=[1, 2], output_dir="ignored", resume=str(runs_file))
    assert calls == [("SASRecREVEAL", 1), ("SASRecREVEAL", 2)]
    assert [r["seed"] for r in results["SASRec"]] == [1, 2] and [r["seed"] for r in results["SASRecREVEAL"]] == [1, 2]
    assert results["SASRec"][1]["test_result"]["ndcg@10"] == pytest.approx(0.072)
    stem = runs_file.name.removesuffix("-runs.json")
    assert (tmp_path / f"{stem}.md").is_file() and (tmp_path / f"{stem}-runs.csv").is_file()
    assert rows[2][0] == "SASRecREVEAL" and rows[2][1] == "2"


def test_resume_from_a_bad_runs_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "x-runs.json"
    bad.write_text("{not json")
    with pytest.raises(UserInputError, match="not a runs file"):
        compare(MODELS, "scientific", seeds=[1], resume=str(bad))
    with pytest.raises(UserInputError, match="no file"):
        compare(MODELS, "scientific", seeds=[1], resume=str(tmp_path / "absent-runs.json"))


def test_each_run_in_one_process_logs_to_its_own_file(tiny_config, monkeypatch):
    """RecBole's basicConfig adds handlers only once per process: the second run must still get its own log."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh process (pytest adds its own)
    settings = {**tiny_config, "state": "INFO", "visual_utilisation": False}
    for seed in (1, 2):
        run_reveal("SASRec", "scientific", config_dict={**settings, "seed": seed})
    logs = sorted((Path.cwd() / "log" / "SASRec").glob("*.log"))
    assert len(logs) == 2
    seeds = [[line for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("seed =")]
             for log in logs]
    assert sorted(seeds) == [["seed = 1"], ["seed = 2"]]
