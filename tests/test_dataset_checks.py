"""Missing or unknown datasets fail at once with what to do, and never reach RecBole's download."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import recbole.data
import recbole.data.dataset.dataset as recbole_dataset_module
import yaml

from reveal_recbole import Config
from reveal_recbole.config import known_datasets
from reveal_recbole.data import DatasetNotPreparedError, MultimodalSequentialDataset, create_dataset
from reveal_recbole.errors import ConfigError, DatasetFileError
from reveal_recbole.resources import PACKAGE_DIR, properties_dir

REPO_ROOT = PACKAGE_DIR.parent


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Fail the test if anything tries RecBole's download."""
    def refuse(*args, **kwargs):
        pytest.fail("RecBole's download was attempted")

    monkeypatch.setattr(recbole_dataset_module, "download_url", refuse)
    monkeypatch.setattr(recbole_dataset_module.Dataset, "_download", refuse)


def prepare_commands(name: str) -> list[str]:
    with open(properties_dir() / "dataset" / f"{name}.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)["prepare_commands"]


def sports_config(tmp_path, model="SASRecREVEAL"):
    """download: never, so that nothing here reaches for the network (tests/test_prepare.py covers auto)."""
    return Config(
        model=model, dataset="sports",
        config_dict={"data_path": str(tmp_path), "checkpoint_dir": str(tmp_path / "saved"), "download": "never"},
    )


def expected_missing(tmp_path, multimodal=True) -> list[Path]:
    folder = tmp_path / "sports"
    files = [folder / "sports.inter"]
    if multimodal:
        files += [folder / f"sports.{m}.{ext}" for m in ("image", "text") for ext in ("npy", "items")]
    return files


@pytest.mark.parametrize(
    "build",
    [create_dataset, MultimodalSequentialDataset, recbole.data.create_dataset],
    ids=["reveal create_dataset", "dataset class", "recbole create_dataset"],
)
def test_unprepared_dataset_names_missing_files_and_command(tmp_path, build):
    with pytest.raises(DatasetNotPreparedError) as excinfo:
        build(sports_config(tmp_path))
    message = str(excinfo.value)
    assert "sports" in message and "not prepared (download: never)" in message
    for path in expected_missing(tmp_path):
        assert str(path) in message
    raw = tmp_path / "sports" / "raw"
    for command in [
        f"curl -fL -C - --create-dirs -o {raw / 'reviews_Sports_and_Outdoors_5.json.gz'} https://snap.stanford.edu/"
        "data/amazon/productGraph/categoryFiles/reviews_Sports_and_Outdoors_5.json.gz",
        f"python dataset_prep/convert_amazon.py --reviews {raw / 'reviews_Sports_and_Outdoors_5.json.gz'} --meta "
        f"{raw / 'meta_Sports_and_Outdoors.json.gz'} --out {tmp_path / 'sports'} --name sports",
        f"python dataset_prep/download_images.py --dir {tmp_path / 'sports'} --name sports --workers 16",
        *prepare_commands("sports"),
    ]:
        assert command in message
    assert "shared/data" not in message  # only what a user has
    assert isinstance(excinfo.value, FileNotFoundError)


def test_baseline_needs_only_the_interactions(tmp_path):
    with pytest.raises(DatasetNotPreparedError) as excinfo:
        create_dataset(sports_config(tmp_path, model="SASRec"))
    message = str(excinfo.value)
    assert str(expected_missing(tmp_path, multimodal=False)[0]) in message
    for path in expected_missing(tmp_path)[1:]:
        assert str(path) not in message


def test_only_the_missing_feature_file_is_named(tmp_path):
    folder = tmp_path / "sports"
    folder.mkdir()
    present = expected_missing(tmp_path)
    for path in present[:-1]:
        path.write_text("")
    with pytest.raises(DatasetNotPreparedError) as excinfo:
        create_dataset(sports_config(tmp_path))
    message = str(excinfo.value)
    assert str(present[-1]) in message
    assert all(str(path) not in message for path in present[:-1])


def test_unknown_dataset_lists_known_ones(tmp_path):
    config = Config(model="SASRecREVEAL", dataset="nosuch", config_dict={"data_path": str(tmp_path)})
    with pytest.raises(DatasetNotPreparedError) as excinfo:
        create_dataset(config)
    message = str(excinfo.value)
    assert "unknown dataset 'nosuch'" in message
    known = known_datasets()
    assert {"scientific", "sports"} <= set(known)
    assert known["scientific"] == "bundled"
    for name in known:
        assert name in message


@pytest.mark.parametrize("dataset, expected", [("sports", "not prepared"), ("nosuch", "unknown dataset")])
def test_cli_exits_with_an_error_message_and_no_traceback(tmp_path, dataset, expected):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_reveal.py"), "--model=SASRecREVEAL", f"--dataset={dataset}",
         f"--data_path={tmp_path}", f"--checkpoint_dir={tmp_path / 'saved'}", "--download=never"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert expected in error_lines[0] and repr(dataset) in error_lines[0]
    assert not (tmp_path / dataset).exists()  # nothing was downloaded or created


def edit_interactions(tiny_data: Path, edit) -> Path:
    """Rewrite the tiny set's ``.inter`` lines with ``edit(header, rows) -> (header, rows)``."""
    path = tiny_data / "scientific" / "scientific.inter"
    header, *rows = path.read_text(encoding="utf-8").splitlines()
    header, rows = edit(header, rows)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def drop_column(index):
    def edit(header, rows):
        keep = lambda line: "\t".join(v for i, v in enumerate(line.split("\t")) if i != index)  # noqa: E731
        return keep(header), [keep(r) for r in rows]
    return edit


BAD_INTERACTIONS = {
    "no timestamp column": (drop_column(2), "missing column(s) timestamp"),
    "no item column": (drop_column(1), "missing column(s) item_id"),
    "header without types": (lambda h, r: (h.replace(":token", ""), r), "not name:type"),
    "timestamp typed token": (lambda h, r: (h.replace("timestamp:float", "timestamp:token"), r), "must be float"),
    "non-numeric timestamp": (lambda h, r: (h, r[:4] + [r[4].rsplit("\t", 1)[0] + "\tyesterday"] + r[5:]),
                              "line 6: timestamp is 'yesterday', not a number"),
    "short row": (lambda h, r: (h, r[:2] + [r[2].rsplit("\t", 1)[0]] + r[3:]), "line 4: 2 columns, the header has 3"),
    "empty timestamp": (lambda h, r: (h, r[:2] + [r[2].rsplit("\t", 1)[0] + "\t"] + r[3:]), "line 4: empty timestamp"),
}


@pytest.mark.parametrize("model", ["SASRec", "SASRecREVEAL"])
@pytest.mark.parametrize("case", list(BAD_INTERACTIONS))
def test_malformed_interaction_file_names_file_line_and_column(tiny_config, tiny_data, case, model):
    edit, expected = BAD_INTERACTIONS[case]
    path = edit_interactions(tiny_data, edit)
    with pytest.raises(DatasetFileError) as excinfo:
        create_dataset(Config(model=model, dataset="scientific", config_dict=tiny_config))
    assert expected in str(excinfo.value) and str(path) in str(excinfo.value)


def test_users_with_one_interaction_are_reported(tiny_config, tiny_data, caplog):
    edit_interactions(
        tiny_data, lambda h, r: (h, r + [f"lonely\t{r[0].split(chr(9))[1]}\t7", f"alone\t{r[1].split(chr(9))[1]}\t8"])
    )
    dataset = create_dataset(Config(model="SASRec", dataset="scientific", config_dict=tiny_config))
    assert dataset.user_num - 1 == 152  # the two are kept, as RecBole does ...
    assert any("2 user(s) have a single interaction" in r.getMessage() for r in caplog.records)  # ... and reported


def test_cli_reports_a_bad_timestamp_in_one_line(tiny_config, tiny_data, tmp_path):
    edit_interactions(tiny_data, BAD_INTERACTIONS["non-numeric timestamp"][0])
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_reveal.py"), "--model=SASRec", "--dataset=scientific",
         f"--data_path={tiny_data}", f"--checkpoint_dir={tmp_path / 'saved'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {tiny_data / 'scientific' / 'scientific.inter'} line 6: timestamp is 'yesterday', not a number"]


def test_topk_beyond_the_catalogue_is_a_config_error(tiny_config):
    config = Config(model="SASRec", dataset="scientific", config_dict=tiny_config | {"topk": [10, 100000]})
    with pytest.raises(ConfigError, match=r"top 100000 items, but scientific has only \d+"):
        create_dataset(config)


def test_lines_with_surplus_columns_are_read_as_recbole_reads_them(tiny_config, tiny_data, caplog):
    """RecBole reads the header's columns and ignores extra trailing values (its own test.inter has such a line)."""
    plain = create_dataset(Config(model="SASRecREVEAL", dataset="scientific", config_dict=tiny_config))
    expected = plain.inter_feat[plain.iid_field].tolist()
    edit_interactions(tiny_data, lambda h, r: (h, r[:2] + [r[2] + "\t5\textra"] + r[3:6] + [r[6] + "\t1"] + r[7:]))
    with caplog.at_level(logging.WARNING):
        dataset = create_dataset(Config(model="SASRecREVEAL", dataset="scientific", config_dict=tiny_config))
    assert dataset.inter_feat[dataset.iid_field].tolist() == expected  # the same interactions, extras ignored
    warnings = [r.getMessage() for r in caplog.records if "more columns than the header" in r.getMessage()]
    assert len(warnings) == 1 and "2 line(s)" in warnings[0] and "first: line 4, 5 columns" in warnings[0]
