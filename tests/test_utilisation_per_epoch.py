"""utilisation_per_epoch: each validation's drops are visual_utilisation's on that model state; a CSV row per epoch."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

import reveal_recbole.diagnostics as diagnostics
from reveal_recbole.config import Config
from reveal_recbole.diagnostics import (
    plot_utilisation_epochs,
    pyplot,
    read_csv_columns,
    utilisation_row,
    utilisation_users,
    visual_utilisation,
)
from reveal_recbole.fve.feedback import collect_valid_feedback
from reveal_recbole.pipeline import prepare_run
from reveal_recbole.quick_start import run_reveal

EPOCHS = 2


def prepared(tiny_config, **keys):
    config = Config(model="SASRecREVEAL", dataset="scientific",
                    config_dict=tiny_config | {"epochs": EPOCHS, "avl": False} | keys)
    return prepare_run(config)


def counting_evaluations(trainer, monkeypatch) -> list:
    calls = []
    evaluate = trainer.evaluate

    def counted(*args, **kwargs):
        calls.append(trainer.model.item_embedding.masked_modalities)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", counted)
    return calls


def test_each_epoch_row_is_visual_utilisation_of_that_model_state(tiny_config, monkeypatch):
    run = prepared(tiny_config, utilisation_per_epoch=True)
    trainer = run.trainer
    expected = []

    def after_validation(epoch, valid_score):  # RecBole calls it right after the epoch's validation
        expected.append(utilisation_row(epoch, visual_utilisation(trainer, run.valid_data)))

    calls = counting_evaluations(trainer, monkeypatch)
    trainer.fit(run.train_data, run.valid_data, saved=False, callback_fn=after_validation)
    assert len(calls) == EPOCHS * (3 + 3)  # per epoch: validation, 2 masked; the check above: 3 more
    assert sorted(map(sorted, calls[:3])) == [[], ["image"], ["text"]]

    rows = read_csv_columns(trainer.utilisation_csv_file, "utilisation")
    assert rows["epoch"] == list(range(EPOCHS))
    for epoch, row in enumerate(expected):
        assert {key: values[epoch] for key, values in rows.items()} == pytest.approx(row)

    fig, ax = pyplot().subplots()
    plot_utilisation_epochs(ax, rows)
    assert [line.get_label() for line in ax.lines[:2]] == ["image masked", "text masked"]
    pyplot().close(fig)


def test_off_means_no_extra_evaluation_and_no_csv(tiny_config, monkeypatch):
    run = prepared(tiny_config, utilisation_per_epoch=False)
    calls = counting_evaluations(run.trainer, monkeypatch)
    run.trainer.fit(run.train_data, run.valid_data, saved=False)
    assert calls == [frozenset()] * EPOCHS
    assert not os.path.exists(run.trainer.utilisation_csv_file)


def test_only_the_modalities_the_model_has_are_masked(tiny_config):
    run = prepared(tiny_config, modalities=["text"], epochs=1)
    run.trainer.fit(run.train_data, run.valid_data, saved=False)
    rows = read_csv_columns(run.trainer.utilisation_csv_file, "utilisation")
    assert list(rows) == ["epoch", "ndcg@10", "recall@20", "text_masked_ndcg@10", "text_masked_recall@20",
                          "text_drop_ndcg@10", "text_drop_recall@20"]


def test_run_reveal_draws_the_drops_per_epoch_in_the_diagnostics_figure(tiny_config, monkeypatch):
    drawn, plot = [], diagnostics.plot_utilisation_epochs

    def recording_plot(ax, epochs):
        drawn.append(epochs)
        plot(ax, epochs)

    monkeypatch.setattr(diagnostics, "plot_utilisation_epochs", recording_plot)
    run_reveal(model="SASRecREVEAL", dataset="scientific", config_dict=tiny_config | {"epochs": EPOCHS, "avl": False})
    assert len(drawn) == 1 and drawn[0]["epoch"] == list(range(EPOCHS))
    assert len(list(Path(tiny_config["checkpoint_dir"]).glob("*.diagnostics.png"))) == 1


def hand_metrics(model, eval_data, users) -> dict[str, float]:
    """NDCG@10 and Recall@20 of ``users`` by hand, from every user's target rank over the whole split."""
    targets = collect_valid_feedback(model, eval_data).targets
    ranks = targets.rank[np.isin(targets.users, users)].astype(float)
    assert len(ranks) == len(users)
    return {"ndcg@10": float(np.mean(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0))),
            "recall@20": float(np.mean(ranks <= 20))}


def test_a_sampled_drop_is_the_drop_of_the_same_users_by_hand(tiny_config, caplog):
    run = prepared(tiny_config, utilisation_users=40, utilisation_per_epoch=False, epochs=1)
    run.trainer.fit(run.train_data, run.valid_data, saved=False)
    with caplog.at_level(logging.INFO):
        report = visual_utilisation(run.trainer, run.test_data, full={"ndcg@10": 9.0, "recall@20": 9.0})
    assert "visual utilisation on a seeded sample of 40 of 150 users" in caplog.text
    users = utilisation_users(run.config, run.test_data)
    assert len(users) == 40 and users.tolist() == utilisation_users(run.config, run.test_data).tolist()

    encoder = run.model.item_embedding
    full = hand_metrics(run.model, run.test_data, users)  # the all-users ``full`` given above is not used
    assert report["full"] == pytest.approx(full, abs=1e-4)  # RecBole rounds to 4 decimals
    for modality in ("image", "text"):
        with encoder.masking([modality]):
            masked = hand_metrics(run.model, run.test_data, users)
        assert report["masked"][modality] == pytest.approx(masked, abs=1e-4)
        for metric in masked:
            assert report["drop"][modality][metric] == pytest.approx(full[metric] - masked[metric], abs=2e-4)
    assert any(report["drop"][m]["ndcg@10"] != 0 for m in ("image", "text"))  # the masks changed rankings
