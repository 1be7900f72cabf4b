"""run_reveal.py turns bad input into one ``error:`` line naming the key, file or value (no traceback)."""
from __future__ import annotations

import sys

import pytest

from conftest import load_script


def run_cli(monkeypatch, tiny_config, *args: str) -> str:
    """Run the CLI in-process (RecBole reads ``--key=value`` from sys.argv); return the exit message."""
    argv = ["run_reveal.py", *args, f"--data_path={tiny_config['data_path']}",
            f"--checkpoint_dir={tiny_config['checkpoint_dir']}", "--state=ERROR", "--epochs=1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as excinfo:
        load_script("run_reveal").main(argv[1:])
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and "Traceback" not in message
    return message


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model=SASRecREVEAL", "--fusion=average"], "fusion must be one of"),
        (["--model=SASRecREVEAL", "--missing_feature=mean"], "missing_feature must be one of"),
        (["--model=SASRecREVEAL", "--avl=True", "--avl_alpha='strong'"], "avl_alpha must be a number, got 'strong'"),
        (["--model=SASRecREVEAL", "--avl=True", "--avl_interval=1.5"], "avl_interval must be an integer"),
        (["--model=SASRecREVEAL", "--modalities=[3]"], "modalities must be a list of names"),
        (["--model=SASRecREVEAL", "--modalities=[image,audio]"], "scientific.audio.npy"),
        (["--model=NoSuchModel"], "unknown model 'NoSuchModel'"),
        (["--model=SASRec,NoSuchModel"], "unknown model 'NoSuchModel'"),
        (["--model=SASRec[avl]"], "bad override"),
    ],
)
def test_bad_config_values_give_one_line(monkeypatch, tiny_config, args, expected):
    assert expected in run_cli(monkeypatch, tiny_config, *args)


def test_malformed_config_file_names_the_file(monkeypatch, tiny_config, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fusion: [sum\nepochs: 2\n", encoding="utf-8")
    message = run_cli(monkeypatch, tiny_config, "--model=SASRecREVEAL", f"--config_files={bad}")
    assert "bad.yaml" in message


def test_missing_config_file_is_named(monkeypatch, tiny_config, tmp_path):
    message = run_cli(monkeypatch, tiny_config, "--model=SASRecREVEAL", f"--config_files={tmp_path / 'nope.yaml'}")
    assert "config file not found" in message and "nope.yaml" in message


@pytest.mark.parametrize("script", ["run_reveal", "run_hyper"])
def test_seeds_that_are_not_integers_are_one_usage_line(script, capsys):
    """Both scripts read --seeds the same way (comparison.seed_list): a bad value names itself, no traceback."""
    with pytest.raises(SystemExit) as excinfo:
        load_script(script).main(["--params_file=unused.hyper", "--seeds=2020,x"])
    assert excinfo.value.code == 2
    message = capsys.readouterr().err
    assert "--seeds: expected comma-separated integer seeds" in message and "'2020,x'" in message
    assert "Traceback" not in message
