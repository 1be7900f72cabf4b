"""Every dataset_prep tool documents itself with --help and fails with a one-line error on bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dataset_prep import (
    convert_amazon,
    convert_decorec,
    convert_s3rec,
    convert_unisrec,
    download_images,
    make_synthetic,
)

ROOT = Path(__file__).resolve().parents[1]

TOOLS = {
    "convert_s3rec": (convert_s3rec, "S3-Rec"),
    "convert_amazon": (convert_amazon, "k-core"),
    "convert_unisrec": (convert_unisrec, "UniSRec"),
    "convert_decorec": (convert_decorec, "DeCoRec"),
    "make_synthetic": (make_synthetic, "visual"),
    "download_images": (download_images, "images.tsv"),
}


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_help(name, capsys):
    module, word = TOOLS[name]
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and word in out and "Usage::" in out


def test_help_as_a_script_from_another_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "dataset_prep" / "convert_s3rec.py"), "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and "--src" in result.stdout


def test_missing_input_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        convert_s3rec.main(["--src", str(tmp_path), "--name", "x", "--out", str(tmp_path / "o")])
    assert str(exit_info.value.code).startswith("error:") and "\n" not in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        convert_amazon.main(
            ["--reviews", str(tmp_path / "missing.json.gz"), "--name", "x", "--out", str(tmp_path / "o")]
        )
    assert str(exit_info.value.code).startswith("error:")
    with pytest.raises(SystemExit) as exit_info:
        convert_unisrec.main(["--src", str(tmp_path), "--name", "x", "--out", str(tmp_path / "o")])
    assert str(exit_info.value.code).startswith("error:")
    with pytest.raises(SystemExit) as exit_info:
        make_synthetic.main(["--items", "5", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2  # argparse's usage error
