"""reveal_recbole.ranking: ranks and top-K lists against a sort written out by hand, and the evaluation batch size."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from recbole.utils import ModelType

from reveal_recbole.config import Config
from reveal_recbole.pipeline import prepare_data
from reveal_recbole.ranking import size_eval_batch, target_ranks, top_k_items

INF = math.inf


def hand_order(row: list[float]) -> list[int]:
    """Item ids by score, highest first, equal scores by lower id: the convention written out."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


def test_target_ranks_count_higher_items_and_equal_ones_of_lower_id():
    # row 0: items 1, 3 and 4 tie at 3.0; item 0 and 5 are masked (-inf)
    scores = torch.tensor([[-INF, 3.0, 1.0, 3.0, 3.0, -INF],
                           [-INF, 0.5, 0.5, 2.0, -INF, 0.5]])
    rows, items = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([1, 3, 4, 2, 2, 5])
    # row 0: 1 -> 1st; 3 -> one equal of lower id (1) -> 2nd; 4 -> 3rd; 2 -> three higher -> 4th
    # row 1: 2 -> 3.0 higher, 0.5 of lower id (1) -> 3rd; 5 -> 4th
    assert target_ranks(scores, rows, items).tolist() == [1, 2, 3, 4, 3, 4]


def test_a_masked_target_ranks_after_every_scored_item_and_masked_ones_of_lower_id():
    scores = torch.tensor([[-INF, 2.0, -INF, 1.0, -INF]])
    assert target_ranks(scores, torch.tensor([0, 0]), torch.tensor([2, 4])).tolist() == [4, 5]


def test_top_k_items_keep_the_lowest_ids_tied_at_the_cut():
    # row 0: five items tie at 0.0 for the last two places (ids 2, 4 win); row 1: two unmasked items, then
    # the masked ones by id; row 2: seven items tie at 4.0 for all four places
    scores = torch.tensor([[-INF, 1.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0],
                           [-INF, -INF, -INF, 7.0, -INF, -INF, -INF, 5.0],
                           [-INF, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]])
    assert top_k_items(scores, 4).tolist() == [[3, 1, 2, 4], [3, 7, 0, 1], [1, 2, 3, 4]]


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("n_items, k", [(40, 10), (300, 50), (7, 20), (5000, 50)])
def test_ranks_and_lists_match_a_sort_by_hand_with_ties_and_masked_items(n_items, k, device):
    generator = torch.Generator().manual_seed(n_items)
    scores = torch.randint(0, 5, (9, n_items), generator=generator).float()  # few values: many ties
    scores[torch.rand(9, n_items, generator=generator) < 0.3] = -INF
    scores[:, 0] = -INF
    scores[8] = 1.0  # one row of equal scores: the list is ids 0..k-1 whatever order topk returns
    rows = torch.tensor([0, 1, 1, 2, 3, 4, 5, 5, 5, 6, 7, 8])  # several targets in some rows
    items = torch.randint(0, n_items, (len(rows),), generator=generator)
    expected_ranks = [hand_order(scores[r].tolist()).index(i) + 1 for r, i in zip(rows.tolist(), items.tolist())]
    on_device = scores.to(device)
    assert target_ranks(on_device, rows, items).tolist() == expected_ranks
    assert top_k_items(on_device, k).tolist() == [hand_order(row)[:k] for row in scores.tolist()]


def test_nan_scores_are_refused():
    scores = torch.tensor([[0.0, math.nan, 1.0]])
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(scores, torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(ValueError, match="NaN"):
        top_k_items(scores, 2)


class FakeConfig(dict):
    """What size_eval_batch reads of RecBole's Config: keys (None when missing) and where the user gave keys."""

    def __init__(self, given: dict, **keys):
        defaults = {"MODEL_TYPE": ModelType.SEQUENTIAL, "eval_batch_size": 4096, "eval_score_budget_mb": 512}
        super().__init__(defaults | keys | given)
        self.file_config_dict, self.variable_config_dict, self.cmd_config_dict = {}, given, {}

    def __getitem__(self, key):
        return self.get(key)


def test_eval_batch_size_is_capped_to_the_score_budget_when_not_set(caplog):
    config = FakeConfig({})
    with caplog.at_level(logging.INFO):
        size_eval_batch(config, 1_000_000)
    assert config["eval_batch_size"] == 512 * 2**20 // (4 * 1_000_000) == 134  # 134 x 1M x 4 bytes < 512 MiB
    assert "eval_batch_size 134 (sized to the catalogue: 4096 users x 1,000,000 items would be 15.3 GB" in caplog.text


def test_a_model_holding_several_score_matrices_gets_a_batch_that_fits_them_all(caplog):
    config = FakeConfig({}, model="MISSRec")
    with caplog.at_level(logging.INFO):
        size_eval_batch(config, 1_000_000, score_buffers=7)
    assert config["eval_batch_size"] == 512 * 2**20 // (4 * 1_000_000 * 7) == 19
    assert "7 score matrices held at once by MISSRec" in caplog.text


@pytest.mark.parametrize("model, buffers", [("SASRecREVEAL", 1), ("M3SRec", 1), ("MISSRec", 3)])
def test_the_pipeline_sizes_the_batch_with_the_models_own_score_matrices(tiny_config, model, buffers):
    """SASRecREVEAL's neighbour term adds to the scores in item blocks and M3SRec's distances are one product:
    one matrix; MISSRec holds its two modalities' cosines and their mix weight."""
    keys = {k: v for k, v in tiny_config.items() if k != "eval_batch_size"} | {"eval_score_budget_mb": 1}
    config = Config(model=model, dataset="scientific", config_dict=keys)
    dataset = prepare_data(config)[0]
    assert config["eval_batch_size"] == 2**20 // (4 * dataset.item_num * buffers)


def test_eval_batch_size_stays_where_the_scores_fit_or_the_user_chose(caplog):
    small = FakeConfig({})
    size_eval_batch(small, 1585)  # 4096 x 1585 x 4 bytes = 25 MB
    assert small["eval_batch_size"] == 4096
    general = FakeConfig({}, MODEL_TYPE=ModelType.GENERAL)  # its loader takes eval_batch_size // n_items users
    size_eval_batch(general, 1_000_000)
    assert general["eval_batch_size"] == 4096
    chosen = FakeConfig({"eval_batch_size": 2048})
    with caplog.at_level(logging.WARNING):
        size_eval_batch(chosen, 1_000_000)
    assert chosen["eval_batch_size"] == 2048 and "eval_batch_size 2048 (set by you)" in caplog.text
    off = FakeConfig({"eval_score_budget_mb": None})
    size_eval_batch(off, 1_000_000)
    assert off["eval_batch_size"] == 4096
