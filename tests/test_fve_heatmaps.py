"""Patch-weight heatmaps of the items whose prompt a tiny FVE run (aligned encoder, stand-in networks) changed."""
import json
from pathlib import Path

import pytest
from PIL import Image

from reveal_recbole.fve.aligned import AlignedPromptEncoder
from reveal_recbole.fve.critic import OfflineCritic
from reveal_recbole.fve.heatmaps import HeatmapError, changed_prompts, main, write_heatmaps
from reveal_recbole.fve.loop import run_fve

from test_fve_aligned import tiny_encoder
from test_fve_loop import DATASET, fve_config  # noqa: F401 - the tiny FVE set (a fixture)


def test_heatmaps_of_a_tiny_run_are_written(fve_config, tmp_path, monkeypatch, capsys):  # noqa: F811
    output = tmp_path / "fve"
    encoder = tiny_encoder()
    run_fve("SASRecREVEAL", DATASET, rounds=1, config_dict=fve_config, encoder=encoder, critic=OfflineCritic(),
            output_dir=output)
    changes = changed_prompts(output)
    assert changes and all(c.round == 1 and c.initial != c.final for c in changes)
    images = Path(fve_config["data_path"]) / DATASET / "images"
    png = write_heatmaps(output, encoder, images, max_items=3)
    assert png == output / "heatmaps.png"
    with Image.open(png) as drawn:
        assert drawn.format == "PNG" and drawn.size[1] > drawn.size[0]  # 3 rows of 2 panels

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "prompt_history.jsonl").write_text(json.dumps(
        {"round": 0, "item": "a", "old_prompt": None, "new_prompt": "p", "changed": True, "kept": True}) + "\n")
    with pytest.raises(HeatmapError, match="no item with an image"):
        write_heatmaps(tmp_path / "empty", encoder, images)
    with pytest.raises(HeatmapError, match="does not exist"):
        changed_prompts(tmp_path / "nowhere")

    # the command line: a missing head is one error; with a head (stand-in networks) it writes the PNG
    with pytest.raises(SystemExit) as exit_info:
        main([str(output), "--images", str(images), "--aligner", str(tmp_path / "none.pt")])
    assert exit_info.value.code == 2 and "train_aligner.py" in capsys.readouterr().err
    monkeypatch.setattr(AlignedPromptEncoder, "from_aligner", classmethod(lambda cls, path: encoder))
    assert main([str(output), "--images", str(images), "--items", "2", "--out", str(tmp_path / "cli.png")]).is_file()
