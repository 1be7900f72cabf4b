"""Tensorboard scalars of a run and the figures drawn from them (reveal_recbole.plots).

Two tiny 2-epoch runs in one process (a baseline, then a REVEAL model), as ``compare`` does.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from reveal_recbole import plots
from reveal_recbole.quick_start import run_reveal

from conftest import make_tiny_config


@pytest.fixture(scope="module")
def runs_dir(tiny_source, tmp_path_factory) -> Path:
    """A working folder with log_tensorboard/ and saved/ from SASRec then SASRecREVEAL."""
    root = tmp_path_factory.mktemp("plots")
    config = make_tiny_config(tiny_source, root / "saved") | {"epochs": 2, "avl": True}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(sys, "argv", sys.argv[:1])
        for model in ("SASRec", "SASRecREVEAL"):
            run_reveal(model, "scientific", config_dict=dict(config))
    return root


def trained(runs_dir: Path) -> dict[str, dict]:
    run_dirs, _ = plots.find_runs([runs_dir / "log_tensorboard"])
    return {run_dir.name.split("-")[0]: plots.read_scalars(run_dir) for run_dir in run_dirs
            if "Loss/Train" in plots.read_scalars(run_dir)}


def test_each_run_has_its_own_tensorboard_folder_with_every_logged_value(runs_dir):
    runs = trained(runs_dir)
    assert set(runs) == {"SASRec", "SASRecREVEAL"}
    for model, scalars in runs.items():
        for tag in ("Loss/Train", "Vaild_score", "Valid/ndcg@10", "Valid/recall@20", "Time/train_s", "Time/valid_s"):
            assert sorted(scalars[tag]) == [0, 1], (model, tag)
        for tag in ("Test/ndcg@10", "Test/recall@20"):
            assert len(scalars[tag]) == 1, (model, tag)
    reveal = runs["SASRecREVEAL"]
    assert sorted(reveal["AVL/k_v"]) == [0, 1]
    for modality in ("image", "text"):
        for metric in ("ndcg@10", "recall@20"):
            assert f"Utilisation/{modality}_masked/{metric}" in reveal
    assert not any(tag.startswith(("AVL/", "Utilisation/")) for tag in runs["SASRec"])


def assert_readable_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert width > 300 and height > 200, (path, image.size)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20, f"{path}: looks blank"


def test_cli_draws_curves_utilisation_and_avl(runs_dir, tmp_path, capsys):
    figures = plots.main(["--runs", str(runs_dir / "log_tensorboard"), str(runs_dir / "saved"), "--out", str(tmp_path)])
    names = sorted(p.name for p in figures)
    assert names[-2:] == ["training_curves.png", "utilisation.png"]
    assert len(names) == 3 and names[0].startswith("avl-SASRecREVEAL-")
    for figure in figures:
        assert_readable_png(figure)
    assert str(figures[0]) in capsys.readouterr().out


def test_run_labels_and_empty_runs(tmp_path):
    label = plots.run_label(Path("SASRecREVEAL-ml-100k-Nov-25-2026_20-38-00-9fcc0d"))
    assert label == "SASRecREVEAL (ml-100k, 20:38:00)"
    assert plots.run_label(Path("GRU4Rec-scientific-Nov-25-2026_20-38-00-2")) == "GRU4Rec (scientific, 20:38:00)"
    assert plots.run_label(Path("custom")) == "custom"
    from torch.utils.tensorboard import SummaryWriter

    SummaryWriter(tmp_path / "rank1").close()  # e.g. a DDP rank > 0: an event file, no scalars
    assert plots.training_runs(plots.find_runs([tmp_path])[0]) == {}
    with pytest.raises(SystemExit):
        plots.main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")])
