"""The learned feature-neighbour score and the count-scaled ID part (issue 22: tail and new items)."""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction
from torch import nn

from reveal_recbole.config import Config
from reveal_recbole.data.features import reduce_features
from reveal_recbole.errors import ConfigError
from reveal_recbole.model.item_encoder import REVEALItemEncoder, id_count_scale
from reveal_recbole.model.neighbour_term import FeatureNeighbourTerm, neighbour_rows
from reveal_recbole.model.reveal import NEIGHBOUR_TERM_BACKBONES
from reveal_recbole.pipeline import build_model, prepare_data

from conftest import random_features

COUNTS = torch.tensor([-1, 3, 0, 2, 1, 0, 4, 5])  # row 0 is padding; items 2 and 5 have no training interaction


def unit_rows(seed: int, dim: int) -> torch.Tensor:
    return F.normalize(random_features(8, dim, seed=seed).values, dim=1)


def neighbour_term(last_items: int = 3) -> FeatureNeighbourTerm:
    torch.manual_seed(0)
    return FeatureNeighbourTerm({"image": unit_rows(1, 6), "text": unit_rows(2, 5)}, COUNTS, hidden_size=4,
                                last_items=last_items)


def test_neighbour_rows_are_unit_rows_or_their_leading_components_made_unit_again():
    features = random_features(8, 6, missing=(5,), seed=1)
    full = neighbour_rows(features)
    torch.testing.assert_close(full, F.normalize(features.values, dim=1))
    reduced = neighbour_rows(features, width=3)
    assert reduced.shape == (8, 3)
    torch.testing.assert_close(reduced.norm(dim=1)[features.present], torch.ones(6))
    assert torch.count_nonzero(reduced[[0, 5]]) == 0  # no feature: no cosine
    # width 3 of 6: the cosines are the leading components' (centred), not the full rows'
    components = reduce_features(full, features.present, 3)
    torch.testing.assert_close(reduced @ reduced.T, F.normalize(components, dim=1) @ F.normalize(components, dim=1).T)
    assert neighbour_rows(features, width=6).shape == (8, 6)


def test_similarities_are_the_recency_weighted_cosines_to_the_last_items():
    term = neighbour_term()
    item_seq, item_seq_len = torch.tensor([[4, 6, 1, 0], [3, 0, 0, 0]]), torch.tensor([3, 1])
    knn = term.similarities(item_seq, item_seq_len)
    rows = [unit_rows(1, 6), unit_rows(2, 5)]
    recency = torch.softmax(term.recency_logits, 0)
    expected = sum(recency[j] * sum(r[[1, 6, 4][j]] @ r.T for r in rows) / 2 for j in range(3))
    expected[[1, 6, 4]] = 0.0  # the query items never score
    torch.testing.assert_close(knn[0], expected)
    only = sum(r[3] @ r.T for r in rows) / 2  # one item in the sequence: it alone, whatever the recency weights
    only[3] = 0.0
    torch.testing.assert_close(knn[1], only)


def test_a_masked_modality_is_left_out_and_every_modality_masked_gives_nothing():
    term = neighbour_term(last_items=1)
    item_seq, item_seq_len = torch.tensor([[2, 0]]), torch.tensor([1])
    text_only = term.similarities(item_seq, item_seq_len, frozenset({"image"}))
    expected = unit_rows(2, 5)[2] @ unit_rows(2, 5).T
    expected[2] = 0.0
    torch.testing.assert_close(text_only[0], expected)
    scores = torch.randn(1, 8)
    unchanged = scores.clone()
    term.add_to(scores, torch.zeros(1, 4), item_seq, item_seq_len, frozenset({"image", "text"}))
    assert torch.equal(scores, unchanged)  # every modality masked: nothing added


def test_the_term_is_user_weight_times_item_weight_times_similarity_and_absent_rows_score_0():
    term = neighbour_term()
    with torch.no_grad():
        term.item_weight.copy_(torch.tensor([-1.0, 2.0]))
    seq_output = torch.randn(2, 4)
    item_seq, item_seq_len = torch.tensor([[4, 6, 1], [3, 0, 0]]), torch.tensor([3, 1])
    scores = term(seq_output, item_seq, item_seq_len)
    user = F.softplus(term.user_weight(seq_output))
    item = torch.sigmoid(-1.0 + 2.0 * torch.log1p(COUNTS.clamp(min=0).float()))
    torch.testing.assert_close(scores, user * item * term.similarities(item_seq, item_seq_len))
    assert item[2] < item[4] < item[1] < item[7]  # more training interactions, more weight (as learned here)
    absent = COUNTS == 0
    masked = term(seq_output, item_seq, item_seq_len, absent=absent)
    assert torch.count_nonzero(masked[:, absent]) == 0
    torch.testing.assert_close(masked[:, ~absent], scores[:, ~absent])


@pytest.mark.parametrize("block_bytes", [4 * 2 * 3, 2**20])  # 3 items per block for 2 users; one block
def test_without_gradients_the_term_is_added_a_block_of_items_at_a_time_with_the_same_scores(monkeypatch,
                                                                                              block_bytes):
    """Evaluation adds the term in item blocks (no second (users, items) buffer): the same sums, the query
    items (a repeated one too) keep the backbone's score."""
    term = neighbour_term()
    with torch.no_grad():
        term.item_weight.copy_(torch.tensor([-1.0, 2.0]))
    seq_output, backbone = torch.randn(2, 4), torch.randn(2, 8)
    item_seq, item_seq_len = torch.tensor([[4, 6, 4], [3, 0, 0]]), torch.tensor([3, 1])
    absent = COUNTS == 0
    one_buffer = term.add_to(backbone.clone(), seq_output, item_seq, item_seq_len, absent=absent).detach()
    monkeypatch.setattr(FeatureNeighbourTerm, "eval_block_bytes", block_bytes)
    with torch.no_grad():
        blocks = term.add_to(backbone.clone(), seq_output, item_seq, item_seq_len, absent=absent)
    torch.testing.assert_close(blocks, one_buffer)
    assert torch.equal(blocks[0, [4, 6]], backbone[0, [4, 6]]) and blocks[1, 3] == backbone[1, 3]
    assert not torch.equal(blocks[0, [1, 7]], backbone[0, [1, 7]])  # the others moved


def test_id_count_scale_is_a_shrinkage_weight():
    scale = id_count_scale(COUNTS, 2.0)
    torch.testing.assert_close(scale, torch.tensor([1.0, 0.6, 0.0, 0.5, 1 / 3, 0.0, 4 / 6, 5 / 7]))


def test_id_shrinkage_scales_each_items_id_part_by_its_count():
    torch.manual_seed(0)
    features = {"image": random_features(8, 6, seed=1)}
    plain = REVEALItemEncoder(nn.Embedding(8, 4, padding_idx=0), features, training_counts=COUNTS).eval()
    shrunk = REVEALItemEncoder(plain.id_embedding, features, training_counts=COUNTS, id_shrinkage=2.0).eval()
    shrunk.load_state_dict(plain.state_dict())
    with torch.no_grad():
        feature_part = plain.projections["image"](plain.modality_input("image"))
        expected = plain.id_embedding.weight * id_count_scale(COUNTS, 2.0).unsqueeze(1) + feature_part
        expected[0] = 0.0
        torch.testing.assert_close(shrunk.weight, expected)
        torch.testing.assert_close(shrunk.fused_rows(torch.tensor([1, 2, 7])), expected[[1, 2, 7]])
    with pytest.raises(ConfigError, match="id_shrinkage must be a number >= 0"):
        REVEALItemEncoder(nn.Embedding(8, 4), features, training_counts=COUNTS, id_shrinkage=-1)
    with pytest.raises(ConfigError, match="id_shrinkage needs at least one modality"):
        REVEALItemEncoder(nn.Embedding(8, 4), features, id_shrinkage=1.0)


def test_feature_neighbours_model_trains_and_scores_with_the_term(tiny_config):
    config = Config(model="SASRecREVEAL", dataset="scientific",
                    config_dict=tiny_config | {"feature_neighbours": True, "loss_type": "CE"})
    _, train_data, _, test_data = prepare_data(config)
    model = build_model(config, train_data)
    assert model.neighbour_term is not None
    interaction = next(iter(train_data))
    loss = model.calculate_loss(interaction)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.neighbour_term.user_weight.weight.grad.abs().sum() > 0
    assert model.neighbour_term.item_weight.grad.abs().sum() > 0
    model.eval()
    batch = next(iter(test_data))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
        seq_output = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
        plain = seq_output @ model.item_embedding.weight.T
        term = model.neighbour_term
        extra = term(seq_output, batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
        torch.testing.assert_close(scores, plain + extra)
        assert extra.abs().sum() > 0
        candidates = Interaction({model.ITEM_SEQ: batch[model.ITEM_SEQ][:2],
                                  model.ITEM_SEQ_LEN: batch[model.ITEM_SEQ_LEN][:2],
                                  model.ITEM_ID: torch.tensor([5, 7])})
        torch.testing.assert_close(model.predict(candidates), scores[[0, 1], [5, 7]])


@pytest.mark.parametrize("model_name, extra, message", [
    ("SASRecREVEAL", {"loss_type": "BPR"}, "needs loss_type: CE"),
    ("BERT4RecREVEAL", {"loss_type": "CE"}, "BERT4Rec does not score the next item"),
    ("SASRecREVEAL", {"loss_type": "CE", "modalities": []}, "needs at least one modality"),
])
def test_feature_neighbours_refuses_what_it_cannot_score(tiny_config, model_name, extra, message):
    config = Config(model=model_name, dataset="scientific",
                    config_dict=tiny_config | {"feature_neighbours": True} | extra)
    _, train_data, _, _ = prepare_data(config)
    with pytest.raises(ConfigError, match=message):
        build_model(config, train_data)
    config["feature_neighbours"] = "auto"  # auto: the same model without the term
    assert build_model(config, train_data).neighbour_term is None


def test_items_whose_id_was_dropped_are_weighed_as_new_items():
    term = neighbour_term()
    with torch.no_grad():
        term.item_weight.copy_(torch.tensor([0.5, 1.0]))
    unknown = torch.zeros(8, dtype=torch.bool)
    unknown[[1, 6]] = True
    weights, plain = term.item_weights(unknown), term.item_weights()
    torch.testing.assert_close(weights[[1, 6]], torch.sigmoid(torch.tensor([0.5, 0.5])))
    torch.testing.assert_close(weights[~unknown], plain[~unknown])


def test_the_encoder_reports_the_ids_it_dropped_in_training_only():
    torch.manual_seed(0)
    features = {"image": random_features(8, 6, seed=1)}
    encoder = REVEALItemEncoder(nn.Embedding(8, 4, padding_idx=0), features, id_dropout=0.5).train()
    table = encoder.compute_table()
    dropped = encoder.dropped_ids
    with torch.no_grad():
        feature_part = encoder.projections["image"](encoder.modality_input("image"))
    rows = torch.arange(1, 8)
    torch.testing.assert_close(table[rows][dropped[rows]], feature_part[rows][dropped[rows]])
    assert 0 < int(dropped[rows].sum()) < 7
    encoder.eval().compute_table()
    assert encoder.dropped_ids is None


def test_feature_neighbours_width_sets_the_terms_rows_and_is_checked(tiny_config):
    config = Config(model="SASRecREVEAL", dataset="scientific",
                    config_dict=tiny_config | {"feature_neighbours": True, "loss_type": "CE",
                                               "feature_neighbours_width": 4})
    _, train_data, _, _ = prepare_data(config)
    term = build_model(config, train_data).neighbour_term
    assert {term.rows_image.shape[1], term.rows_text.shape[1]} == {4}
    config["feature_neighbours_width"] = 0
    with pytest.raises(ConfigError, match="feature_neighbours_width must be an integer >= 1"):
        build_model(config, train_data)


@pytest.mark.parametrize("name", sorted(NEIGHBOUR_TERM_BACKBONES))
def test_each_supported_backbone_scores_with_the_plain_product_the_term_is_added_to(name):
    """The term replaces the backbone's CE loss and full ranking by ``forward @ item table + term``: guard that
    RecBole's own are exactly that product (a RecBole change adding a loss term would be silently lost)."""
    backbone = getattr(importlib.import_module(f"recbole.model.sequential_recommender.{name.lower()}"), name)
    loss = " ".join(inspect.getsource(backbone.calculate_loss).split())
    ce_branch = loss[loss.rindex("else:"):]
    assert ce_branch.endswith("test_item_emb = self.item_embedding.weight logits = torch.matmul(seq_output, "
                              "test_item_emb.transpose(0, 1)) loss = self.loss_fct(logits, pos_items) return loss")
    ranking = " ".join(inspect.getsource(backbone.full_sort_predict).split())
    assert "seq_output = self.forward(item_seq, item_seq_len) test_items_emb = self.item_embedding.weight" in ranking
    assert list(inspect.signature(backbone.forward).parameters) == ["self", "item_seq", "item_seq_len"]


def test_add_to_adds_the_term_in_place_with_the_gradients_of_the_plain_formula():
    """The fused in-place path (user weight in the queries, one multiply-add) against the formula written out."""
    term = neighbour_term()
    seq_output = torch.randn(2, 4, requires_grad=True)
    table = torch.randn(8, 4, requires_grad=True)
    item_seq, item_seq_len = torch.tensor([[4, 6, 1], [3, 5, 0]]), torch.tensor([3, 2])
    targets = torch.tensor([2, 7])
    fused = term.add_to(seq_output @ table.T, seq_output, item_seq, item_seq_len)
    F.cross_entropy(fused, targets).backward()
    fused_grads = [p.grad.clone() for p in (seq_output, table, *term.parameters())]
    for p in (seq_output, table, *term.parameters()):
        p.grad = None
    items, weights = term.query_items(item_seq, item_seq_len)
    cosines = sum((weights.unsqueeze(2) * r[items]).sum(1) @ r.T for r in (term.rows_image, term.rows_text)) / 2
    cosines = cosines.scatter(1, items, 0.0)
    plain = seq_output @ table.T + F.softplus(term.user_weight(seq_output)) * cosines * term.item_weights()
    torch.testing.assert_close(fused.detach(), plain.detach())
    F.cross_entropy(plain, targets).backward()
    for fused_grad, p in zip(fused_grads, (seq_output, table, *term.parameters())):
        torch.testing.assert_close(fused_grad, p.grad)
