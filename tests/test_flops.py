"""RecBole's FLOPs count in run_reveal: counted for a model of ordinary size, skipped (logged) above the limit."""
from __future__ import annotations

import logging

import reveal_recbole.quick_start as quick_start
from reveal_recbole.config import Config
from reveal_recbole.pipeline import prepare_run


def test_flops_are_counted_below_the_limit_and_skipped_above(tiny_config, monkeypatch, caplog):
    run = prepare_run(Config(model="SASRecREVEAL", dataset="scientific", config_dict=tiny_config))
    tensors = [*run.model.parameters(), *run.model.buffers()]
    size_mb = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    assert quick_start.model_flops(run.model, run.dataset, run.config) > 0  # a tiny model: RecBole's count runs

    def no_copy(*args):
        raise AssertionError("RecBole's count (and its deep copy) must not run")

    monkeypatch.setattr(quick_start, "count_flops", no_copy)
    monkeypatch.setattr(quick_start, "FLOPS_MAX_MODEL_MB", size_mb * 0.99)
    with caplog.at_level(logging.INFO):
        assert quick_start.model_flops(run.model, run.dataset, run.config) is None
    assert f"FLOPs not counted: SASRecREVEAL's parameters and buffers take {size_mb:,.1f} MB" in caplog.text
