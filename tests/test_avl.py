"""AVL: the K_v formula, exact gradient scaling, the avl switch, resume, and every REVEAL model."""
from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from recbole.trainer import Trainer

from reveal_recbole.config import Config
from reveal_recbole.errors import ConfigError
from reveal_recbole.pipeline import build_model, prepare_data
from reveal_recbole.registry import get_trainer
from reveal_recbole.trainer.avl import (
    AdaptiveVisualLearning,
    AVLConfig,
    agm_weights,
    masked_losses,
    update_running_mean,
    visual_weight,
)

from conftest import assert_report_metrics

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "feature_dropout": 0.0}


def build(config_dict, model="SASRecREVEAL", trainer_class=None, model_seed=None):
    """Config, model, trainer and loaders as ``run_reveal`` builds them; ``model_seed`` re-seeds the model init."""
    config = Config(model=model, dataset="scientific", config_dict=config_dict)
    _, train_data, valid_data, test_data = prepare_data(config)
    if model_seed is not None:
        config["seed"] = model_seed
    net = build_model(config, train_data)
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


@pytest.mark.parametrize(
    "loss_v, loss_t, mean_v, mean_t, alpha",
    [(3.0, 2.0, 2.5, 2.5, 1.0), (2.0, 2.4, 2.1, 2.3, 0.5), (5.0, 5.0, 5.0, 5.0, 1.0), (6.6, 7.1, 6.8, 6.9, 2.0)],
)
def test_agm_weights_match_the_authors_formula(loss_v, loss_t, mean_v, mean_t, alpha):
    """M3SRec/trainers.py: s = -L, r = exp(s_img - s_txt), tau = exp(hat_s_img - hat_s_txt),
    clamp(exp(-alpha (r - tau)), 0.2, 2)."""
    s_img, s_txt, hat_img, hat_txt = -loss_v, -loss_t, -mean_v, -mean_t
    kappa_img = math.exp(-alpha * (math.exp(s_img - s_txt) - math.exp(hat_img - hat_txt)))
    kappa_txt = math.exp(-alpha * (math.exp(s_txt - s_img) - math.exp(hat_txt - hat_img)))
    k_v, k_t = agm_weights(loss_v, loss_t, mean_v, mean_t, alpha)
    assert float(k_v) == pytest.approx(min(max(kappa_img, 0.2), 2.0), rel=1e-9)
    assert float(k_t) == pytest.approx(min(max(kappa_txt, 0.2), 2.0), rel=1e-9)


def test_agm_weights_clamp_without_overflow_and_boost_a_lagging_image():
    assert [float(k) for k in agm_weights(0.0, 900.0, 0.0, 0.0)] == pytest.approx([0.2, 2.0])
    assert [float(k) for k in agm_weights(900.0, 0.0, 0.0, 0.0)] == pytest.approx([2.0, 0.2])
    k_v, k_t = agm_weights(3.0, 2.0, 2.5, 2.5)  # images did worse than usual: boosted, text damped
    assert float(k_v) > 1.0 > float(k_t)


class RunningLosses(torch.nn.Module):
    """Just the buffer AVL keeps its running means in (a REVEAL model's ``avl_running_losses``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("avl_running_losses", torch.zeros(3, dtype=torch.float64))


def authors_weights(losses, variant: str, alpha: float = 1.0) -> list[tuple[float, float]]:
    """The authors' per-step loop in Python floats: t += 1; bar = bar (t - 1) / t + L / t; then the weight."""
    t, bar_v, bar_t, out = 0, 0.0, 0.0, []
    for loss_v, loss_t in losses:
        t += 1
        bar_v = bar_v * (t - 1) / t + loss_v / t
        bar_t = bar_t * (t - 1) / t + loss_t / t
        if variant == "reveal":  # REVEAL/AVL/trainers.py, M3SRecTrainer._avl_compute_Kv
            k_v = min(max(math.exp(alpha * (math.exp(loss_v - loss_t) - math.exp(bar_v - bar_t))), 0.1), 10.0)
            out.append((k_v, 1.0))
        else:  # M3SRec/trainers.py, FinetuneTrainer._agm_compute_kappas (on s = -L)
            r, tau = math.exp(loss_t - loss_v), math.exp(bar_t - bar_v)
            k_v = min(max(math.exp(-alpha * (r - tau)), 0.2), 2.0)
            k_t = min(max(math.exp(-alpha * (1 / r - 1 / tau)), 0.2), 2.0)
            out.append((k_v, k_t))
    return out


@pytest.mark.parametrize("variant", ["reveal", "agm"])
def test_cumulative_means_match_the_authors_trainers_step_by_step(variant):
    """The step's losses are folded into the cumulative means before K is computed: K = 1 at step 1."""
    generator = torch.Generator().manual_seed(0)
    losses = [(float(v), float(t)) for v, t in 5.0 + torch.rand(300, 2, generator=generator, dtype=torch.float64)]
    avl = AdaptiveVisualLearning(RunningLosses(), AVLConfig(variant=variant, momentum=None))
    ours = []
    for loss_v, loss_t in losses:
        avl.update(torch.tensor(loss_v, dtype=torch.float64), torch.tensor(loss_t, dtype=torch.float64))
        ours.append((float(avl.k_v), float(avl.k_t)))
    expected = authors_weights(losses, variant)
    assert ours[0] == (1.0, 1.0)
    flat = lambda pairs: [k for pair in pairs for k in pair]  # noqa: E731
    assert flat(ours) == pytest.approx(flat(expected), rel=1e-12)
    assert len({k for k, _ in ours}) > 100  # K moved
    state = avl.model.avl_running_losses
    assert float(state[0]) == pytest.approx(sum(v for v, _ in losses) / len(losses), rel=1e-13)


def test_variant_defaults_are_each_trainers_own(tiny_config):
    assert (AVLConfig().k_min, AVLConfig().k_max, AVLConfig().momentum) == (0.1, 10.0, 0.9)
    agm = AVLConfig(variant="agm")
    assert (agm.k_min, agm.k_max, agm.momentum, agm.alpha) == (0.2, 2.0, None, 1.0)  # M3SRec/main.py defaults
    assert AVLConfig(variant="agm", k_max=3.0, momentum=0.5).k_max == 3.0
    config = Config(model="SASRecREVEAL", dataset="scientific", config_dict=tiny_config | {"avl_variant": "agm"})
    assert AVLConfig.from_config(config) == agm
    given = {"avl_variant": "agm", "avl_min": 0.5, "avl_momentum": None}
    config = Config(model="SASRecREVEAL", dataset="scientific", config_dict=tiny_config | given)
    settings = AVLConfig.from_config(config)
    assert (settings.k_min, settings.k_max, settings.momentum) == (0.5, 2.0, None)
    config = Config(model="SASRecREVEAL", dataset="scientific", config_dict=tiny_config)
    assert AVLConfig.from_config(config) == AVLConfig()


@pytest.mark.parametrize(
    "key, value, word",
    [("avl_variant", "gam", "avl_variant"), ("avl_min", "low", "avl_min"), ("avl_momentum", "auto?", "avl_momentum")],
)
def test_avl_variant_keys_reject_bad_values(tiny_config, key, value, word):
    config = Config(model="SASRecREVEAL", dataset="scientific", config_dict=tiny_config | {key: value})
    with pytest.raises(ConfigError, match=word):
        AVLConfig.from_config(config)


def test_avl_config_rejects_bad_values(tiny_config):
    for key, value in (("avl_min", 2.0), ("avl_max", 0.5), ("avl_interval", 0), ("avl_momentum", 1.5)):
        config = Config(model="SASRecREVEAL", dataset="scientific", config_dict=tiny_config | {key: value})
        with pytest.raises(ValueError, match=key.replace("avl_", "") if key != "avl_min" else "avl_min"):
            AVLConfig.from_config(config)


def gradients(model, interaction) -> dict[str, torch.Tensor]:
    model.train()  # as a trainer steps (after fit, a model is left in eval mode)
    model.zero_grad()
    model.calculate_loss(interaction).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_scaling_is_exact(tiny_config):
    # fine-tuned feature tables, so the image table is among the scaled parameters too
    _, model, trainer, train_data, *_ = build(tiny_config | NO_DROPOUT | {"avl": False, "feature_trainable": True})
    interaction = first_batch(train_data)
    plain = gradients(model, interaction)

    avl = AdaptiveVisualLearning(model, AVLConfig())
    assert torch.equal(gradients(model, interaction)["item_embedding.projections.image.weight"],
                       plain["item_embedding.projections.image.weight"])  # no hooks until attached
    avl.attach_hooks()
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


def test_agm_scales_image_and_text_gradients(tiny_config):
    _, model, _, train_data, *_ = build(tiny_config | NO_DROPOUT | {"avl": False})
    interaction = first_batch(train_data)
    plain = gradients(model, interaction)
    avl = AdaptiveVisualLearning(model, AVLConfig(variant="agm"))
    encoder = model.item_embedding
    names = {id(p): n for n, p in model.named_parameters()}
    image = {names[id(p)] for p in encoder.modality_parameters("image")}
    text = {names[id(p)] for p in encoder.modality_parameters("text")}
    with avl.gradient_hooks():
        avl.k_v, avl.k_t = torch.tensor(1.5), torch.tensor(0.4)
        scaled = gradients(model, interaction)
    for name, grad in plain.items():
        factor = 1.5 if name in image else 0.4 if name in text else 1.0
        torch.testing.assert_close(scaled[name], factor * grad, rtol=1e-6, atol=1e-9)
    assert torch.equal(gradients(model, interaction)["item_embedding.projections.text.weight"],
                       plain["item_embedding.projections.text.weight"])  # the block removed the hooks


def avl_step(model, interaction, scaler) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One AVL training step backpropagated through ``scaler`` with K_v = 2.5: (logged norms, unscaled grads)."""
    avl = AdaptiveVisualLearning(model, AVLConfig())
    model.zero_grad()
    with avl.gradient_hooks():
        loss = avl.training_loss(interaction)
        avl.k_v = torch.tensor(2.5)
        scaler.scale(loss).backward()
    summary = avl.end_epoch(0)
    grads = {name: p.grad / scaler.get_scale() for name, p in model.named_parameters() if p.grad is not None}
    return summary, grads


def test_gradient_norms_are_logged_unscaled_under_amp(tiny_config):
    """Before: the logged norms were the GradScaler's scaled ones, 1024x here (65536x with RecBole's default)."""
    _, model, _, train_data, *_ = build(tiny_config | NO_DROPOUT | {"avl": False, "feature_trainable": True})
    interaction = first_batch(train_data)
    state = copy.deepcopy(model.state_dict())
    plain_summary, plain = avl_step(model, interaction, torch.amp.GradScaler("cpu", enabled=False))
    model.load_state_dict(state)
    scaled_summary, scaled = avl_step(model, interaction, torch.amp.GradScaler("cpu", init_scale=1024.0))

    for name, grad in plain.items():  # K_v scales the scaled gradients as the true ones: unscaled, they agree
        torch.testing.assert_close(scaled[name], grad, rtol=1e-5, atol=1e-9)
    names = {id(p): name for name, p in model.named_parameters()}
    for modality in ("image", "text"):
        grads = [plain[names[id(p)]] for p in model.item_embedding.modality_parameters(modality)]
        norm = math.sqrt(sum(float(grad.pow(2).sum()) for grad in grads))
        assert plain_summary[f"grad_norm_{modality}"] == pytest.approx(norm, rel=1e-5)
        assert scaled_summary[f"grad_norm_{modality}"] == pytest.approx(norm, rel=1e-5)


def hooked(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p._backward_hooks]


def test_a_second_trainer_on_the_same_model_never_sees_the_first_ones_k_v(tiny_config):
    """Before: the first trainer's hooks stayed, and its stale K_v kept scaling the image gradients."""
    on = tiny_config | NO_DROPOUT | {"avl": True}
    off = tiny_config | NO_DROPOUT | {"avl": False}
    _, model, first, train_data, valid_data, _ = build(on)
    first.fit(train_data, valid_data, saved=False, show_progress=False)
    assert hooked(model) == []  # removed when fit returned
    first.avl.k_v = torch.tensor(3.0)  # whatever the first trainer last had

    config_off, reference, *_ = build(off)  # the same weights on a model no trainer ever hooked
    reference.load_state_dict(model.state_dict())
    interaction = first_batch(train_data)
    plain = gradients(reference, interaction)

    second = get_trainer(config_off["MODEL_TYPE"], "SASRecREVEAL")(config_off, model)
    assert second.avl is None
    for name, grad in gradients(model, interaction).items():  # AVL off in the second: unscaled
        torch.testing.assert_close(grad, plain[name], rtol=0, atol=0)

    config_on = Config(model="SASRecREVEAL", dataset="scientific", config_dict=on)
    third = get_trainer(config_on["MODEL_TYPE"], "SASRecREVEAL")(config_on, model)
    image_ids = {id(q) for q in model.item_embedding.modality_parameters("image")}
    visual = {n for n, p in model.named_parameters() if id(p) in image_ids}
    with third.avl.gradient_hooks():  # what its training epochs run inside
        third.avl.k_v = torch.tensor(2.5)
        scaled = gradients(model, interaction)
    for name, grad in scaled.items():  # only its own K_v: 2.5, not 2.5 x 3
        torch.testing.assert_close(grad, (2.5 if name in visual else 1.0) * plain[name], rtol=1e-6, atol=1e-9)
    third._train_epoch(train_data, 0)
    assert hooked(model) == []


def test_hooks_are_removed_when_fit_raises(tiny_config):
    _, model, trainer, train_data, valid_data, _ = build(tiny_config | {"avl": True})
    calls = []
    original = trainer.avl.training_loss

    def failing(interaction):
        calls.append(1)
        if len(calls) == 2:
            assert hooked(model)  # attached while training
            raise RuntimeError("interrupted")
        return original(interaction)

    trainer.avl.training_loss = failing
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.fit(train_data, valid_data, saved=False, show_progress=False)
    assert hooked(model) == []


def test_masked_losses_equal_the_model_built_without_that_modality(tiny_config):
    """Masking removes the image's projected embedding: L_t is the loss of a text-only model with the same weights."""
    settings = tiny_config | NO_DROPOUT | {"avl": False}
    _, model, trainer, train_data, valid_data, _ = build(settings)
    _, text_only, text_trainer, *_ = build(settings | {"modalities": ["text"]})
    missing, unexpected = text_only.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all("image" in key for key in unexpected)
    interaction = first_batch(train_data)
    _, loss_t = masked_losses(model, interaction)
    text_only.eval()
    with torch.no_grad():
        assert float(loss_t) == pytest.approx(float(text_only.calculate_loss(interaction)), rel=1e-6)

    from reveal_recbole.diagnostics import visual_utilisation

    report = visual_utilisation(trainer, valid_data, modalities=("image",))
    text_result = text_trainer.evaluate(valid_data, load_best_model=False)
    assert report["masked"]["image"] == pytest.approx({m: float(text_result[m]) for m in report["full"]})


def test_agm_epoch_uses_cumulative_means_and_its_clamp(tiny_config):
    _, model, trainer, train_data, *_ = build(tiny_config | {"avl": True, "avl_variant": "agm"})
    assert trainer.avl.settings.momentum is None
    assert model.avl_running_losses.dtype == torch.float64  # as the authors' Python floats: no float32 drift
    trainer._train_epoch(train_data, 0)
    with open(trainer.avl_csv_file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(train_data) > 1
    assert (float(rows[0]["k_v"]), float(rows[0]["k_t"])) == (1.0, 1.0)
    assert all(0.2 <= float(r[k]) <= 2.0 for r in rows for k in ("k_v", "k_t"))
    mean_v = sum(float(r["loss_v"]) for r in rows) / len(rows)
    assert float(model.avl_running_losses[0]) == pytest.approx(mean_v, rel=1e-6)

    from reveal_recbole.diagnostics import plot_k_v, pyplot, read_avl_csv

    fig, ax = pyplot().subplots()
    plot_k_v(ax, read_avl_csv(trainer.avl_csv_file))
    assert [line.get_label() for line in ax.lines[:2]] == ["K_v (image)", "K_t (text)"]
    pyplot().close(fig)


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
    new_mean_v, new_mean_t = 0.9 * mean_v + 0.1 * (mean_v + 0.3), mean_t  # reveal's auto momentum: 0.9
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
    *_, plain_trainer, train_b, _, _ = build(settings, trainer_class=Trainer)
    assert reveal_losses == losses_per_epoch(plain_trainer, train_b)


def test_avl_on_changes_training_and_writes_step_csv(tiny_config):
    _, off_model, off_trainer, train_off, _, _ = build(tiny_config | {"avl": False})
    losses_per_epoch(off_trainer, train_off, 1)
    _, on_model, on_trainer, train_on, _, _ = build(tiny_config | {"avl": True})
    losses_per_epoch(on_trainer, train_on, 1)
    image_off, image_on = (m.item_embedding.projections["image"].weight for m in (off_model, on_model))
    assert not torch.equal(image_off, image_on)  # K_v scaled the image gradients (Adam: only where K_v moved)
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


@pytest.mark.parametrize(
    "options",
    [{"fusion": "moe", "avl_variant": "agm"}, {"fusion": "gated", "score_with": "id", "id_dropout": 0.2}],
)
def test_new_encoder_and_avl_options_train_and_evaluate(tiny_config, options):
    from reveal_recbole.quick_start import run_reveal

    result = run_reveal("SASRecREVEAL", "scientific", config_dict=tiny_config | {"avl": True} | options, saved=False)
    assert_report_metrics(result["test_result"])
    assert set(result["utilisation"]["drop"]) == {"image", "text"}


def test_bpr_loss_with_avl(tiny_config):
    settings = tiny_config | {
        "avl": True, "loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
    }
    _, model, trainer, train_data, *_ = build(settings)
    loss = trainer._train_epoch(train_data, 0)
    assert math.isfinite(loss)
    assert int(model.avl_running_losses[2]) == len(train_data)


def test_masked_passes_reuse_the_loss_passs_projections(tiny_config):
    """Within a step AVL's masked passes project no feature row again, and their losses are unchanged by it."""
    _, model, _, train_data, *_ = build(tiny_config | {"avl": True})
    interaction = first_batch(train_data)
    encoder = model.item_embedding
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in encoder.projections.values()]
    model.train()
    model.calculate_loss(interaction)
    assert len(calls) == 2  # image and text, once each
    reused = masked_losses(model, interaction)
    assert len(calls) == 2  # L_v and L_t projected nothing
    encoder._projection_cache.clear()
    fresh = masked_losses(model, interaction)
    assert len(calls) == 4  # without the cache each masked pass projects its unmasked modality
    assert torch.equal(reused[0], fresh[0]) and torch.equal(reused[1], fresh[1])
    with torch.no_grad():  # a changed parameter (an optimiser step) is a new state: each projected once again
        encoder.projections["image"].weight.mul_(2.0)
    changed = masked_losses(model, interaction)
    assert len(calls) == 6 and not torch.equal(changed[0], fresh[0])
    for hook in hooks:
        hook.remove()
