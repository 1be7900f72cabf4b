"""AVL: the K_v formula, exact gradient scaling, the avl switch, resume, and every REVEAL model."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from recbole.data import data_preparation
from recbole.trainer import Trainer
from recbole.utils import init_seed

from reveal_recbole.config import Config
from reveal_recbole.data import create_dataset
from reveal_recbole.trainer.avl import (
    AdaptiveVisualLearning,
    AVLConfig,
    masked_losses,
    update_running_mean,
    visual_weight,
)
from reveal_recbole.utils import get_model, get_trainer, with_trusted_checkpoints

from conftest import assert_report_metrics

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "feature_dropout": 0.0}


def build(config_dict, model="SASRecREVEAL", trainer_class=None, model_seed=None):
    """Config, model, trainer and loaders as ``run_reveal`` builds them; ``model_seed`` re-seeds the model init."""
    config = Config(model=model, dataset="scientific", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] if model_seed is None else model_seed, config["reproducibility"])
    net = get_model(model)(config, train_data._dataset)
    trainer = (trainer_class or get_trainer(config["MODEL_TYPE"], model))(config, net)
    return config, net, trainer, train_data, valid_data, test_data


def first_batch(train_data):
    return next(iter(train_data))


@pytest.mark.parametrize(
    "loss_v, loss_t, mean_v, mean_t, alpha",
    [(3.0, 2.0, 2.5, 2.5, 1.0), (2.0, 2.4, 2.1, 2.3, 0.5), (5.0, 5.0, 5.0, 5.0, 1.0), (7.1, 6.6, 7.0, 6.6, 2.0)],
)
def test_visual_weight_matches_the_formula(loss_v, loss_t, mean_v, mean_t, alpha):
    expected = math.exp(alpha * (math.exp(loss_v - loss_t) - math.exp(mean_v - mean_t)))
    expected = min(max(expected, 0.1), 10.0)
    assert float(visual_weight(loss_v, loss_t, mean_v, mean_t, alpha)) == pytest.approx(expected, rel=1e-9)


def test_visual_weight_clamps_without_overflow():
    assert float(visual_weight(900.0, 0.0, 0.0, 0.0)) == pytest.approx(10.0)
    assert float(visual_weight(0.0, 900.0, 900.0, 0.0)) == pytest.approx(0.1)
    assert float(visual_weight(3.0, 1.0, 1.0, 1.0, k_min=0.5, k_max=2.0)) == pytest.approx(2.0)
    assert float(visual_weight(1.0, 1.0, 3.0, 1.0, k_min=0.5, k_max=2.0)) == pytest.approx(0.5)


def test_running_means_exponential_and_cumulative():
    values = [4.0, 2.0, 3.0, 7.0]
    ema, cumulative = 0.0, 0.0
    for count, value in enumerate(values):
        ema = float(update_running_mean(ema, value, count, 0.9))
        cumulative = float(update_running_mean(cumulative, value, count, None))
    expected_ema = 4.0
    for value in values[1:]:
        expected_ema = 0.9 * expected_ema + 0.1 * value
    assert ema == pytest.approx(expected_ema)
    assert cumulative == pytest.approx(sum(values) / len(values))


def test_avl_config_rejects_bad_values(tiny_config):
    for key, value in (("avl_min", 2.0), ("avl_max", 0.5), ("avl_interval", 0), ("avl_momentum", 1.5)):
        config = Config(model="SASRecREVEAL", dataset="scientific", config_dict=tiny_config | {key: value})
        with pytest.raises(ValueError, match=key.replace("avl_", "") if key != "avl_min" else "avl_min"):
            AVLConfig.from_config(config)


def gradients(model, interaction) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model.calculate_loss(interaction).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_scaling_is_exact(tiny_config):
    _, model, trainer, train_data, *_ = build(tiny_config | NO_DROPOUT | {"avl": False})
    interaction = first_batch(train_data)
    plain = gradients(model, interaction)

    avl = AdaptiveVisualLearning(model, AVLConfig())
    avl.k_v = torch.tensor(2.5)
    scaled = gradients(model, interaction)
    visual = {id(p) for p in model.item_embedding.modality_parameters("image")}
    names_visual = {n for n, p in model.named_parameters() if id(p) in visual}
    assert names_visual == {
        "item_embedding.feature_tables.image",
        "item_embedding.projections.image.weight",
        "item_embedding.projections.image.bias",
    }
    for name, grad in plain.items():
        factor = 2.5 if name in names_visual else 1.0
        torch.testing.assert_close(scaled[name], factor * grad, rtol=1e-6, atol=1e-9)
    avl.remove_hooks()
    torch.testing.assert_close(gradients(model, interaction)["item_embedding.projections.image.weight"],
                               plain["item_embedding.projections.image.weight"])


def test_training_loss_updates_k_v_from_masked_losses(tiny_config):
    _, model, _, train_data, *_ = build(tiny_config | NO_DROPOUT | {"avl": False})
    interaction = first_batch(train_data)
    loss_v, loss_t = masked_losses(model, interaction)
    with model.item_embedding.masking(["text"]):
        model.eval()
        direct_v = model.calculate_loss(interaction)
        model.train()
    assert float(loss_v) == pytest.approx(float(direct_v.detach()), rel=1e-6)
    assert float(loss_v) != pytest.approx(float(loss_t))

    avl = AdaptiveVisualLearning(model, AVLConfig(alpha=1.0))
    avl.training_loss(interaction)
    assert float(avl.k_v) == pytest.approx(1.0)  # the first step initialises the means
    mean_v, mean_t, count = model.avl_running_losses.tolist()
    assert (mean_v, mean_t, count) == pytest.approx((float(loss_v), float(loss_t), 1.0), rel=1e-5)

    avl.update(torch.tensor(mean_v + 0.3), torch.tensor(mean_t))
    new_mean_v, new_mean_t = 0.9 * mean_v + 0.1 * (mean_v + 0.3), mean_t
    expected = visual_weight(mean_v + 0.3, mean_t, new_mean_v, new_mean_t)
    assert float(avl.k_v) == pytest.approx(float(expected), rel=1e-5)
    assert float(avl.k_v) > 1.0  # images alone did worse than usual: their gradients are boosted


def test_avl_interval_holds_k_v_between_updates(tiny_config):
    _, model, _, train_data, *_ = build(tiny_config | {"avl": False})
    avl = AdaptiveVisualLearning(model, AVLConfig(interval=3))
    batches = [b for _, b in zip(range(4), train_data)]
    for batch in batches:
        avl.training_loss(batch)
    assert int(model.avl_running_losses[2]) == 2  # steps 0 and 3
    rows = avl._records + [avl._pending]
    assert [r["loss_v"] is not None for r in rows] == [True, False, False, True]


def losses_per_epoch(trainer, train_data, epochs=2):
    return [trainer._train_epoch(train_data, epoch) for epoch in range(epochs)]


def test_avl_off_trains_exactly_like_recbole_trainer(tiny_config):
    settings = tiny_config | {"avl": False}
    *_, reveal_trainer, train_a, _, _ = build(settings)
    assert reveal_trainer.avl is None
    reveal_losses = losses_per_epoch(reveal_trainer, train_a)  # each build re-seeds: train before the next
    *_, plain_trainer, train_b, _, _ = build(settings, trainer_class=with_trusted_checkpoints(Trainer))
    assert reveal_losses == losses_per_epoch(plain_trainer, train_b)


def test_avl_on_changes_training_and_writes_step_csv(tiny_config):
    *_, off_trainer, train_off, _, _ = build(tiny_config | {"avl": False})
    off = losses_per_epoch(off_trainer, train_off, 1)
    *_, on_trainer, train_on, _, _ = build(tiny_config | {"avl": True})
    on = losses_per_epoch(on_trainer, train_on, 1)
    assert off != on
    with open(on_trainer.avl_csv_file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(train_on)
    assert all(0.1 <= float(r["k_v"]) <= 10.0 for r in rows)
    assert all(float(r["grad_norm_image"]) > 0 and float(r["grad_norm_text"]) > 0 for r in rows)


def test_resume_restores_running_means(tiny_config):
    settings = tiny_config | {"avl": True, "epochs": 1}
    _, model, trainer, train_data, valid_data, _ = build(settings)
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    saved_state = model.avl_running_losses.clone()
    assert saved_state[2] == len(train_data)

    _, fresh_model, fresh_trainer, *_ = build(settings)
    assert fresh_model.avl_running_losses[2] == 0
    fresh_trainer.resume_checkpoint(trainer.saved_model_file)
    torch.testing.assert_close(fresh_model.avl_running_losses, saved_state)


@pytest.mark.parametrize("model", ["SASRecREVEAL", "GRU4RecREVEAL", "BERT4RecREVEAL", "NARMREVEAL"])
def test_each_reveal_model_trains_with_avl(tiny_config, model):
    from reveal_recbole.quick_start import run_reveal

    result = run_reveal(model, "scientific", config_dict=tiny_config | {"avl": True}, saved=False)
    assert_report_metrics(result["test_result"])
    drops = result["utilisation"]["drop"]
    assert set(drops) == {"image", "text"}
    assert all(math.isfinite(v) for d in drops.values() for v in d.values())


def test_bpr_loss_with_avl(tiny_config):
    settings = tiny_config | {
        "avl": True, "loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
    }
    _, model, trainer, train_data, *_ = build(settings)
    loss = trainer._train_epoch(train_data, 0)
    assert math.isfinite(loss)
    assert int(model.avl_running_losses[2]) == len(train_data)
