"""compare(): a baseline and its REVEAL version on one split, one table (.md and .csv), best marked."""
import csv
import sys

import pytest
import torch

import reveal_recbole.quick_start as quick_start
from reveal_recbole.quick_start import compare

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
    original = quick_start.data_preparation

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

    monkeypatch.setattr(quick_start, "data_preparation", recording_data_preparation)
    results, rows = compare(MODELS, "scientific", config_dict=tiny_config, output_dir=str(output_dir))
    return results, rows, output_dir, splits


def test_compare_writes_one_table_of_both_models(compared):
    results, rows, output_dir, _ = compared
    assert list(results) == MODELS
    for result in results.values():
        assert_report_metrics(result["test_result"])
        assert result["train_seconds"] > 0

    md_files, csv_files = list(output_dir.glob("*.md")), list(output_dir.glob("*.csv"))
    assert len(md_files) == 1 and len(csv_files) == 1
    assert md_files[0].stem == csv_files[0].stem and "scientific" in md_files[0].stem

    with open(csv_files[0], newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert table == rows
    header, body = table[0], table[1:]
    assert header[: 1 + len(REPORT_METRICS)] == ["model", *REPORT_METRICS]
    assert [row[0] for row in body] == MODELS

    markdown = md_files[0].read_text(encoding="utf-8").splitlines()
    assert markdown[0] == "| " + " | ".join(header) + " |"
    assert [line.split("|")[1].strip() for line in markdown[2:]] == MODELS
    assert len(markdown) == 2 + len(MODELS)

    for column, metric in enumerate(REPORT_METRICS, start=1):
        values = [float(row[column].rstrip("*")) for row in body]
        for row, model in zip(body, MODELS):
            # the table shows the run's own value, marked when it is the column's best
            assert float(row[column].rstrip("*")) == pytest.approx(float(results[model]["test_result"][metric]), abs=5e-5)
            assert row[column].endswith("*") == (float(row[column].rstrip("*")) == max(values)), (metric, row)
        assert any(row[column].endswith("*") for row in body)


def test_compare_gives_every_model_the_same_split(compared):
    _, _, _, splits = compared
    baseline, reveal = (splits[m] for m in MODELS)
    assert baseline["test_users"] == reveal["test_users"] == baseline["test_size"] == reveal["test_size"] > 0
    for part in ("train", "valid", "test"):
        for left, right in zip(baseline[part], reveal[part]):
            assert torch.equal(left, right), part
