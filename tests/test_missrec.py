"""MISSRec: interest clustering, interest tokens, training, scoring with its features, AVL and the pipeline."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from reveal_recbole.errors import ConfigError
from reveal_recbole.model.missrec import MISSRec, kmeans_step, nearest_centres, warn_if_clustering_is_large
from reveal_recbole.quick_start import run_reveal
from reveal_recbole.registry import get_model, get_trainer
from reveal_recbole.resources import properties_dir
from reveal_recbole.trainer import MISSRecTrainer

from conftest import assert_report_metrics
from test_peer_models import (
    assert_predict_agrees_with_full_sort_predict,
    eval_batch,
    first_batch,
    moved_columns,
    prepared,
    scores_after_perturbing,
    train_one_epoch,
    users_without,
)


def test_nearest_centres_in_blocks_is_the_brute_force_argmin():
    g = torch.Generator().manual_seed(0)
    points, centres = torch.randn(50, 4, generator=g), torch.randn(7, 4, generator=g)
    expected = torch.cdist(points, centres).argmin(1)
    assert torch.equal(nearest_centres(points, centres, block_bytes=6 * 7 * 4), expected)  # 6 points a block


def test_kmeans_step_moves_each_centre_to_the_mean_of_its_points_then_reassigns():
    g = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(20, 2, generator=g) * 0.1 + torch.tensor(c) for c in ([0.0, 0.0], [5.0, 5.0])])
    starts = blobs[torch.randperm(40, generator=torch.Generator().manual_seed(3))[:2]]  # the step's first centres
    first = torch.cdist(blobs, starts).argmin(1)
    centres, assignment = kmeans_step(blobs, 2, torch.Generator().manual_seed(3), block_bytes=7 * 2 * 4)
    for cluster in range(2):  # one mean update from the first assignment
        torch.testing.assert_close(centres[cluster], blobs[first == cluster].mean(0))
    assert torch.equal(assignment, torch.cdist(blobs, centres).argmin(1))  # then every point to its nearest centre
    # two well-separated blobs: one step finds them
    assert len(set(assignment[:20].tolist())) == 1 and len(set(assignment[20:].tolist())) == 1
    assert assignment[0] != assignment[20]
    same = kmeans_step(blobs, 2, torch.Generator().manual_seed(3), block_bytes=2**20)
    assert torch.equal(same[1], assignment)  # the block size changes nothing


def test_missrec_is_registered_with_its_trainer():
    assert get_model("MISSRec") is MISSRec
    assert get_trainer(None, "MISSRec") is MISSRecTrainer


def test_interests_cover_every_items_text_and_image_row_and_padding_stays_0(tiny_config):
    model = prepared(tiny_config, "MISSRec").model
    assert not model.interests_found  # found before training or at the first forward, not at build
    model.discover_interests(epoch=-1)
    n = model.n_items
    assert model.num_interests == n - 1  # interest_ratio 0.5 of 2 modalities x (n - 1) items
    assert model.interest_lookup.shape == (2, n)
    assert torch.equal(model.interest_lookup[:, 0], torch.zeros(2, dtype=torch.long))
    assert int(model.interest_lookup[:, 1:].min()) >= 1 and int(model.interest_lookup.max()) <= model.num_interests
    assert torch.count_nonzero(model.interest_embeddings[0]) == 0
    # each item's row sits in the interest whose centre is nearest to its adapted row
    encoder = model.item_embedding
    with torch.no_grad():
        text = encoder.adaptors["text"](encoder.feature_tables["text"][1:])
    nearest = nearest_centres(text, model.interest_embeddings[1:], block_bytes=2**20) + 1
    text_row = list(encoder.modalities).index("text")
    assert torch.equal(model.interest_lookup[text_row, 1:], nearest)


def test_interest_tokens_are_each_sequences_distinct_interests(tiny_config):
    model = prepared(tiny_config, "MISSRec").model
    with torch.no_grad():
        model.interest_lookup.copy_(torch.zeros_like(model.interest_lookup))
        model.interest_lookup[0, 1:6] = torch.tensor([3, 3, 4, 9, 9])
        model.interest_lookup[1, 1:6] = torch.tensor([4, 7, 7, 7, 2])
    item_seq = torch.tensor([[1, 2, 3, 0, 0], [5, 5, 5, 5, 0]])
    tokens = model.interest_tokens(item_seq)
    assert sorted(t for t in tokens[0].tolist() if t) == [3, 4, 7]  # items 1-3: image 3, 3, 4; text 4, 7, 7
    assert sorted(t for t in tokens[1].tolist() if t) == [2, 9]
    assert tokens.shape == (2, 3)  # trimmed to the longest list


def test_missrec_trains_and_finds_its_interests_again_every_epoch(tiny_config):
    run = prepared(tiny_config, "MISSRec", utilisation_per_epoch=False)
    batch = first_batch(run)
    with torch.no_grad():
        start = float(run.model.eval().calculate_loss(batch))
    run.model.train()
    first_centres = run.model.interest_embeddings.clone()  # found by the first forward above
    first = train_one_epoch(run)
    for epoch in range(1, 3):
        run.trainer._train_epoch(run.train_data, epoch)
    assert not torch.equal(run.model.interest_embeddings, first_centres)  # re-clustered from the trained adaptors
    with torch.no_grad():
        end = float(run.model.eval().calculate_loss(batch))
    assert math.isfinite(first) and end < start
    assert run.model.fusion_factor.grad is not None


@pytest.mark.parametrize("stage, modality", [("transductive_ft", "image"), ("inductive_ft", "text")])
def test_missrec_scores_items_with_their_features(tiny_config, stage, modality):
    run = prepared(tiny_config, "MISSRec", train_stage=stage)
    before, after, sequences = scores_after_perturbing(run, modality, 7, [run.model.item_embedding.feature_tables])
    assert moved_columns(before, after, users_without(sequences, 7)) == {7}


def test_inductive_missrec_has_no_id_table_and_scores_an_item_from_its_features_alone(tiny_config):
    run = prepared(tiny_config, "MISSRec", train_stage="inductive_ft")
    model = run.model.eval()
    assert model.item_embedding.id_embedding is None
    tables = model.item_embedding.feature_tables
    with torch.no_grad():
        for modality in model.item_embedding.modalities:
            tables[modality][9] = tables[modality][4]  # item 9 now looks like item 4: it must score like item 4
        scores = model.full_sort_predict(eval_batch(run))
    torch.testing.assert_close(scores[:, 9], scores[:, 4])


@pytest.mark.parametrize("fusion", ["dynamic_shared", "dynamic_instance", "static"])
def test_missrec_predict_agrees_with_full_sort_predict(tiny_config, fusion):
    run = prepared(tiny_config, "MISSRec", item_mm_fusion=fusion)
    if fusion != "static":
        with torch.no_grad():
            run.model.fusion_factor.copy_(torch.linspace(1.0, 3.0, run.model.fusion_factor.numel())
                                          .view_as(run.model.fusion_factor))  # away from the plain mean
    assert_predict_agrees_with_full_sort_predict(run)


@pytest.mark.parametrize("stage", ["transductive_ft", "inductive_ft"])
@pytest.mark.parametrize("fusion", ["dynamic_shared", "dynamic_instance", "static"])
def test_ranking_without_gradients_in_place_gives_the_training_scores(tiny_config, fusion, stage):
    """The catalogue's scores without gradients (buffers reused) equal the differentiable ones, masked or not."""
    model = prepared(tiny_config, "MISSRec", item_mm_fusion=fusion, train_stage=stage).model.eval()
    if fusion != "static":
        with torch.no_grad():
            model.fusion_factor.copy_(torch.linspace(-2.0, 3.0, model.fusion_factor.numel())
                                      .view_as(model.fusion_factor))
    sequence = torch.nn.functional.normalize(torch.randn(4, model.hidden_size), dim=-1)
    for masked in ((), ("image",)):
        with model.item_embedding.masking(masked):
            differentiable = model.fused_logits(sequence)
            with torch.no_grad():
                in_place = model.fused_logits(sequence)
        assert differentiable.requires_grad and not in_place.requires_grad
        torch.testing.assert_close(in_place, differentiable.detach(), rtol=1e-5, atol=1e-5)


def test_the_dynamic_fusion_weighs_each_modalitys_cosine_by_a_softmax(tiny_config):
    model = prepared(tiny_config, "MISSRec", train_stage="inductive_ft").model.eval()
    sequence = torch.nn.functional.normalize(torch.randn(3, model.hidden_size), dim=-1)
    with torch.no_grad():
        model.fusion_factor.fill_(1.5)
        logits = model.fused_logits(sequence)
        cosines = torch.stack([sequence @ torch.nn.functional.normalize(model.item_embedding.adapted(m), dim=-1).T
                               for m in model.item_embedding.modalities], dim=-1)
    expected = (cosines * torch.softmax(1.5 * cosines, dim=-1)).sum(-1) / model.temperature
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_missrec_masks_image_and_text_for_the_diagnostics(tiny_config):
    run = prepared(tiny_config, "MISSRec")
    model = run.model.eval()
    interaction = eval_batch(run)
    with torch.no_grad():
        full = model.full_sort_predict(interaction)  # finds the interests: none before
        lookup = model.interest_lookup.clone()
        with model.item_embedding.masking(["image"]):
            assert torch.count_nonzero(model.item_embedding.adapted("image")) == 0
            masked = model.full_sort_predict(interaction)
        again = model.full_sort_predict(interaction)
    assert not torch.allclose(full, masked)
    torch.testing.assert_close(full, again)
    assert torch.equal(model.interest_lookup, lookup)
    adaptor = {id(p) for p in model.item_embedding.adaptors["image"].parameters()}
    assert {id(p) for p in model.item_embedding.modality_parameters("image")} == adaptor


def test_missrec_with_avl_runs_an_epoch_with_the_avl_trainer(tiny_config):
    run = prepared(tiny_config, "MISSRec", avl=True, utilisation_per_epoch=False)
    assert run.trainer.avl is not None
    assert math.isfinite(float(run.trainer._train_epoch(run.train_data, 0)))
    assert float(run.model.avl_running_losses[2]) >= 1


@pytest.mark.parametrize("keys, match", [({"train_stage": "pretrain"}, "train_stage"),
                                         ({"loss_type": "BPR"}, "CE"),
                                         ({"item_mm_fusion": "late"}, "item_mm_fusion"),
                                         ({"modalities": []}, "at least one")])
def test_missrec_refuses_what_it_cannot_do(tiny_config, keys, match):
    with pytest.raises(ConfigError, match=match):
        prepared(tiny_config, "MISSRec", **keys)


def test_missrec_yaml_keeps_the_reveal_defaults_for_avl_fve_and_the_diagnostics():
    base = yaml.safe_load((properties_dir() / "reveal_base.yaml").read_text(encoding="utf-8"))
    ours = yaml.safe_load((properties_dir() / "model" / "MISSRec.yaml").read_text(encoding="utf-8"))
    shared = [k for k in base if k.startswith(("avl", "fve_", "utilisation", "visual_", "diagnostics", "image_dir"))]
    assert {k: ours.get(k, "missing") for k in shared} == {k: base[k] for k in shared}


def test_missrec_runs_through_run_reveal_with_buckets_cold_split_and_utilisation(tiny_config):
    result = run_reveal("MISSRec", "scientific", config_dict=tiny_config | {"cold_item_share": 0.2})
    assert_report_metrics(result["test_result"])
    assert result["buckets"]["cold"]["n"] > 0
    assert set(result["utilisation"]["drop"]) == {"image", "text"}



def test_a_loaded_checkpoint_keeps_its_interests_and_finds_none_again(tiny_config):
    trained = prepared(tiny_config, "MISSRec").model
    trained.discover_interests(epoch=3)
    fresh = prepared(tiny_config, "MISSRec").model
    fresh.load_state_dict(trained.state_dict())
    assert fresh.interests_found
    assert torch.equal(fresh.interest_lookup, trained.interest_lookup)


def test_evaluation_adapts_the_catalogue_once_per_parameter_state(tiny_config):
    """Ranking batches reuse the adapted rows; a changed weight, training mode or gradients recompute them."""
    model = prepared(tiny_config, "MISSRec").model.eval()
    encoder = model.item_embedding
    calls = []
    encoder.adaptors["image"].register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    with torch.no_grad():
        first = encoder.adapted("image")
        again = encoder.adapted("image")
        assert again is first and calls == [model.n_items]
        encoder.adaptors["image"].weight.add_(1.0)  # an optimiser step or a loaded checkpoint
        changed = encoder.adapted("image")
        assert len(calls) == 2 and not torch.equal(changed, first)
        torch.testing.assert_close(changed, encoder.adaptors["image"](encoder.feature_tables["image"]))  # 3rd call
    encoder.adapted("image")  # with gradients: computed, not cached
    model.train()
    with torch.no_grad():
        encoder.adapted("image")  # training mode (dropout in other adaptors, UniSRec's gate noise): computed
    assert len(calls) == 5
    model.eval().double()  # moved to a new dtype (or device): new tensors, their versions unchanged
    with torch.no_grad():
        assert encoder.adapted("image").dtype == torch.float64 and len(calls) == 6


def test_a_clustering_that_grows_past_minutes_per_epoch_is_said_once_at_build(caplog):
    """The per-epoch k-means is items^2 work: a catalogue where it costs minutes says so and how to lower it."""
    with caplog.at_level("WARNING"):
        warn_if_clustering_is_large(points=2 * 2000, interests=2000, hidden=64, ratio=0.5)
    assert not caplog.records
    with caplog.at_level("WARNING"):
        warn_if_clustering_is_large(points=2 * 100_000, interests=100_000, hidden=64, ratio=0.5)
    (record,) = caplog.records
    assert "interest_ratio" in record.getMessage() and "100,000 interests" in record.getMessage()
