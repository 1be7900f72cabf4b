"""The multimodal peers M3SRec and UniSRec: they train, score with their features, plug into AVL and the diagnostics."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from reveal_recbole.config import Config
from reveal_recbole.errors import ConfigError
from reveal_recbole.model.m3srec import M3SRec, wasserstein_distance, wasserstein_distance_matmul
from reveal_recbole.model.unisrec import UniSRec
from reveal_recbole.pipeline import prepare_run
from reveal_recbole.quick_start import run_reveal
from reveal_recbole.registry import get_model, get_trainer
from reveal_recbole.resources import properties_dir
from reveal_recbole.trainer import REVEALTrainer

from conftest import assert_report_metrics


def prepared(tiny_config, model: str, **keys):
    config = Config(model=model, dataset="scientific", config_dict=tiny_config | keys)
    return prepare_run(config)


def first_batch(run):
    return next(iter(run.train_data)).to(run.config["device"])


def eval_batch(run):
    """The first validation batch (a full-ranking loader: the interaction of its users)."""
    return next(iter(run.valid_data))[0].to(run.config["device"])


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def train_one_epoch(run) -> float:
    before = snapshot(run.model)
    loss = run.trainer._train_epoch(run.train_data, 0)
    after = snapshot(run.model)
    assert any(not torch.equal(before[name], after[name]) for name in before), "no parameter changed"
    return float(sum(loss) if isinstance(loss, tuple) else loss)


@torch.no_grad()
def scores_after_perturbing(run, modality: str, item: int, tables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, scores once noise is added to ``item``'s ``modality`` row in each of ``tables``, item sequences)."""
    model = run.model.eval()
    interaction = eval_batch(run)
    before = model.full_sort_predict(interaction)
    noise = torch.randn(tables[0][modality].shape[1], generator=torch.Generator().manual_seed(0))
    for table in {id(t[modality]): t[modality] for t in tables}.values():  # frozen tables may be one tensor
        table[item] += noise
    return before, model.full_sort_predict(interaction), interaction[model.ITEM_SEQ]


def moved_columns(before, after, users) -> set[int]:
    return {int(c) for c in torch.nonzero((before[users] - after[users]).abs() > 1e-6)[:, 1]}


def users_without(sequences, item: int) -> torch.Tensor:
    return (sequences != item).all(1)


# ----------------------------------------------------------------------------- M3SRec
def test_wasserstein_matmul_agrees_with_the_pairwise_distance():
    g = torch.Generator().manual_seed(1)
    mean1, mean2 = torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g)
    cov1, cov2 = torch.rand(3, 5, generator=g) + 0.1, torch.rand(4, 5, generator=g) + 0.1
    pairwise = wasserstein_distance(mean1[:, None], cov1[:, None], mean2[None], cov2[None])
    torch.testing.assert_close(wasserstein_distance_matmul(mean1, cov1, mean2, cov2), pairwise, rtol=1e-4, atol=1e-4)
    by_hand = ((mean1[0] - mean2[1]) ** 2).sum() + ((cov1[0].sqrt() - cov2[1].sqrt()) ** 2).sum()
    assert float(pairwise[0, 1]) == pytest.approx(float(by_hand), rel=1e-5)


def test_wasserstein_matmul_gradients_and_batched_heads_agree_with_the_pairwise_distance():
    """The one-product form (row terms added in place) keeps autograd's gradients and works per attention head."""
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(2, 3, 4, 5, generator=g), torch.rand(2, 3, 4, 5, generator=g) + 0.1,
              torch.randn(2, 3, 6, 5, generator=g), torch.rand(2, 3, 6, 5, generator=g) + 0.1]
    grads = []
    for distance in ("matmul", "pairwise"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        mean1, cov1, mean2, cov2 = leaves
        if distance == "matmul":
            value = wasserstein_distance_matmul(mean1, cov1, mean2, cov2)
        else:
            value = wasserstein_distance(mean1[..., :, None, :], cov1[..., :, None, :],
                                         mean2[..., None, :, :], cov2[..., None, :, :])
        (value * torch.linspace(0, 1, value.numel()).view_as(value)).sum().backward()
        grads.append((value.detach(), [leaf.grad for leaf in leaves]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-4)
    for matmul, pairwise in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(matmul, pairwise, rtol=1e-4, atol=1e-4)


def test_wasserstein_matmul_keeps_the_row_terms_precision_under_half_precision_products():
    """Under autocast the product is half precision: the distance must stay float32 as the out-of-place sum was."""
    g = torch.Generator().manual_seed(3)
    mean1, mean2 = torch.randn(2, 4, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    cov1, cov2 = torch.rand(2, 4, 8, generator=g) + 0.1, torch.rand(2, 5, 8, generator=g) + 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance = wasserstein_distance_matmul(mean1, cov1, mean2, cov2)
    assert distance.dtype == torch.float32
    torch.testing.assert_close(distance, wasserstein_distance_matmul(mean1, cov1, mean2, cov2), rtol=0.05, atol=0.1)


def test_m3srec_is_registered_with_the_reveal_trainer():
    assert get_model("M3SRec") is M3SRec
    assert get_trainer(None, "M3SRec") is REVEALTrainer


def test_m3srec_trains_an_epoch_and_its_loss_falls(tiny_config):
    run = prepared(tiny_config, "M3SRec")
    batch = first_batch(run)
    with torch.no_grad():
        start = float(run.model.calculate_loss(batch))
    first = train_one_epoch(run)
    for epoch in range(1, 3):
        run.trainer._train_epoch(run.train_data, epoch)
    with torch.no_grad():
        end = float(run.model.eval().calculate_loss(batch))
    assert math.isfinite(first) and math.isfinite(end)
    assert end < start


def test_m3srec_scores_items_with_their_features(tiny_config):
    run = prepared(tiny_config, "M3SRec")
    encoders = run.model.item_embedding
    item = 7
    tables = [encoders.mean.feature_tables, encoders.cov.feature_tables]
    before, after, sequences = scores_after_perturbing(run, "image", item, tables)
    users = users_without(sequences, item)
    assert users.any()
    assert moved_columns(before, after, users) == {item}  # only the perturbed item's own column


def test_m3srec_scoring_with_ids_as_the_authors_ignores_a_candidates_features(tiny_config):
    run = prepared(tiny_config, "M3SRec", score_with="id")
    encoders = run.model.item_embedding
    before, after, sequences = scores_after_perturbing(run, "text", 7, [encoders.mean.feature_tables,
                                                                         encoders.cov.feature_tables])
    assert moved_columns(before, after, users_without(sequences, 7)) == set()


def assert_predict_agrees_with_full_sort_predict(run, item: int = 5) -> None:
    """``predict`` on one candidate per user scores it as ``full_sort_predict``'s column does."""
    model = run.model.eval()
    interaction = eval_batch(run)
    with torch.no_grad():
        full = model.full_sort_predict(interaction)
        interaction.update(type(interaction)({model.ITEM_ID: torch.full((len(full),), item)}))
        torch.testing.assert_close(model.predict(interaction), full[:, item], rtol=1e-4, atol=1e-4)


def test_m3srec_predict_agrees_with_full_sort_predict(tiny_config):
    assert_predict_agrees_with_full_sort_predict(prepared(tiny_config, "M3SRec"))


def test_m3srec_masks_image_and_text_in_both_branches(tiny_config):
    run = prepared(tiny_config, "M3SRec")
    model = run.model.eval()
    interaction = eval_batch(run)
    with torch.no_grad():
        full = model.full_sort_predict(interaction)
        with model.item_embedding.masking(["image"]):
            assert model.item_embedding.mean.masked_modalities == model.item_embedding.cov.masked_modalities
            image_masked = model.full_sort_predict(interaction)
        again = model.full_sort_predict(interaction)
    assert not torch.allclose(full, image_masked)
    torch.testing.assert_close(full, again)
    image_params = {id(p) for p in model.item_embedding.modality_parameters("image")}
    for branch in (model.item_embedding.mean, model.item_embedding.cov):
        assert {id(p) for p in branch.projections["image"].parameters()} <= image_params
        assert {id(p) for p in branch.moe.part_parameters("image")} <= image_params


def test_m3srec_with_avl_runs_a_training_step_with_the_avl_trainer(tiny_config):
    run = prepared(tiny_config, "M3SRec", avl=True, utilisation_per_epoch=False)
    assert isinstance(run.trainer, REVEALTrainer) and run.trainer.avl is not None
    loss = run.trainer._train_epoch(run.train_data, 0)
    assert math.isfinite(float(loss))
    assert float(run.model.avl_running_losses[2]) >= 1  # masked losses folded in at least once
    assert all(math.isfinite(float(v)) for v in run.model.avl_running_losses[:2])


def test_m3srec_yaml_keeps_the_reveal_defaults_for_avl_fve_and_the_diagnostics():
    """M3SRec is not a *REVEAL model, so reveal_base.yaml is not loaded for it: its yaml repeats those keys."""
    base = yaml.safe_load((properties_dir() / "reveal_base.yaml").read_text(encoding="utf-8"))
    ours = yaml.safe_load((properties_dir() / "model" / "M3SRec.yaml").read_text(encoding="utf-8"))
    shared = [k for k in base if k.startswith(("avl", "fve_", "utilisation", "visual_", "diagnostics", "image_dir"))]
    assert len(shared) > 20
    assert {k: ours.get(k, "missing") for k in shared} == {k: base[k] for k in shared}


def test_m3srec_refuses_another_loss(tiny_config):
    with pytest.raises(ConfigError, match="BPR"):
        prepared(tiny_config, "M3SRec", loss_type="CE")


# ----------------------------------------------------------------------------- UniSRec
def test_unisrec_is_registered_with_the_reveal_trainer():
    assert get_model("UniSRec") is UniSRec
    assert get_trainer(None, "UniSRec") is REVEALTrainer


@pytest.mark.parametrize("stage", ["transductive_ft", "inductive_ft"])
def test_unisrec_trains_an_epoch_and_its_loss_falls(tiny_config, stage):
    run = prepared(tiny_config, "UniSRec", train_stage=stage)
    batch = first_batch(run)
    with torch.no_grad():
        start = float(run.model.eval().calculate_loss(batch))
    run.model.train()
    first = train_one_epoch(run)
    for epoch in range(1, 3):
        run.trainer._train_epoch(run.train_data, epoch)
    with torch.no_grad():
        end = float(run.model.eval().calculate_loss(batch))
    assert math.isfinite(first) and end < start


@pytest.mark.parametrize("stage", ["transductive_ft", "inductive_ft"])
def test_unisrec_scores_items_with_their_text(tiny_config, stage):
    run = prepared(tiny_config, "UniSRec", train_stage=stage)
    before, after, sequences = scores_after_perturbing(run, "text", 7, [run.model.item_embedding.feature_tables])
    assert moved_columns(before, after, users_without(sequences, 7)) == {7}


def test_inductive_unisrec_has_no_id_table_and_scores_an_item_from_its_text_alone(tiny_config):
    run = prepared(tiny_config, "UniSRec", train_stage="inductive_ft")
    model = run.model.eval()
    assert model.item_embedding.id_embedding is None
    n_items = model.n_items
    assert not [name for name, p in model.named_parameters() if p.shape[0] == n_items]  # no per-item parameter
    text = model.item_embedding.feature_tables["text"]
    with torch.no_grad():
        text[9] = text[4]  # item 9 now reads like item 4: it must score like item 4
        scores = model.full_sort_predict(eval_batch(run))
    torch.testing.assert_close(scores[:, 9], scores[:, 4])


def test_transductive_unisrec_masks_text_down_to_its_ids(tiny_config):
    run = prepared(tiny_config, "UniSRec")
    model = run.model.eval()
    interaction = eval_batch(run)
    with torch.no_grad():
        full = model.full_sort_predict(interaction)
        with model.item_embedding.masking(["text"]):
            masked = model.full_sort_predict(interaction)
            torch.testing.assert_close(model.item_embedding.weight, model.item_embedding.id_embedding.weight)
    assert not torch.allclose(full, masked)
    with pytest.raises(KeyError):
        model.item_embedding.masking(["image"]).__enter__()


def test_unisrec_with_avl_says_avl_is_off(tiny_config, caplog):
    run = prepared(tiny_config, "UniSRec", avl=True)
    assert run.trainer.avl is None
    assert "AVL is off" in caplog.text


@pytest.mark.parametrize("keys, match", [({"train_stage": "pretrain"}, "train_stage"),
                                         ({"modalities": ["image", "text"]}, "one modality"),
                                         ({"loss_type": "BPR"}, "CE")])
def test_unisrec_refuses_what_it_cannot_do(tiny_config, keys, match):
    with pytest.raises(ConfigError, match=match):
        prepared(tiny_config, "UniSRec", **keys)


# ----------------------------------------------------------------------------- the run_reveal pipeline
@pytest.mark.parametrize("spec", [{"model": "M3SRec"}, {"model": "UniSRec", "train_stage": "inductive_ft"}])
def test_peers_run_through_run_reveal_with_buckets_cold_split_and_utilisation(tiny_config, spec):
    keys = dict(spec)
    model = keys.pop("model")
    result = run_reveal(model, "scientific", config_dict=tiny_config | keys | {"cold_item_share": 0.2})
    assert_report_metrics(result["test_result"])
    assert result["buckets"]["cold"]["n"] > 0
    assert set(result["utilisation"]["drop"]) == ({"image", "text"} if model == "M3SRec" else {"text"})
