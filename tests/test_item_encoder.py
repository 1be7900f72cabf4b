"""REVEALItemEncoder: a drop-in ``item_embedding`` fusing ID and projected modality features."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reveal_recbole.errors import ConfigError
from reveal_recbole.model import REVEALItemEncoder

from conftest import random_features

N_ITEMS, DIM, IMAGE_DIM, TEXT_DIM = 12, 8, 6, 5
MISSING_IMAGE = (3, 7)  # items without an image feature row
FUSIONS = ("sum", "concat", "gated", "moe")


def make_encoder(modalities=("image", "text"), n_items=N_ITEMS, **kwargs) -> REVEALItemEncoder:
    torch.manual_seed(0)
    id_embedding = nn.Embedding(n_items, DIM, padding_idx=0)
    features = {
        "image": random_features(n_items, IMAGE_DIM, missing=MISSING_IMAGE, seed=1),
        "text": random_features(n_items, TEXT_DIM, seed=2),
    }
    encoder = REVEALItemEncoder(id_embedding, {m: features[m] for m in modalities}, **kwargs)
    return encoder.eval()


def projection(encoder, modality, inputs=None) -> torch.Tensor:
    layer = encoder.projections[modality]
    return layer(encoder.feature_tables[modality] if inputs is None else inputs)


def test_no_modalities_is_the_plain_embedding():
    encoder = make_encoder(modalities=())
    ids = torch.tensor([[0, 1, 5], [11, 2, 0]])
    assert torch.equal(encoder(ids), encoder.id_embedding(ids))
    assert encoder.weight is encoder.id_embedding.weight
    assert list(encoder.parameters()) == list(encoder.id_embedding.parameters())


@pytest.mark.parametrize("fusion", FUSIONS)
def test_full_ranking_table_matches_per_item_lookup(fusion):
    encoder = make_encoder(fusion=fusion)
    table = encoder.weight
    assert table.shape == (N_ITEMS, DIM)
    for item in range(N_ITEMS):
        assert torch.equal(encoder(torch.tensor([item]))[0], table[item]), item
    ids = torch.tensor([[4, 2, 0], [9, 9, 1]])
    assert torch.equal(encoder(ids), table[ids])


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("missing_feature", ["zero", "learned"])
def test_padding_row_is_zero(fusion, missing_feature):
    encoder = make_encoder(fusion=fusion, missing_feature=missing_feature).train()
    assert torch.count_nonzero(encoder.weight[0]) == 0
    assert torch.count_nonzero(encoder(torch.tensor([0]))) == 0
    assert torch.count_nonzero(encoder.weight[1:].detach().abs().sum(1)) == N_ITEMS - 1


def test_sum_fusion_is_id_plus_projections():
    encoder = make_encoder(fusion="sum", feature_norm="none")
    with torch.no_grad():
        expected = encoder.id_embedding.weight + projection(encoder, "image") + projection(encoder, "text")
        expected[0] = 0
        torch.testing.assert_close(encoder.weight, expected)


def test_feature_norm_l2_normalises_present_rows_only():
    encoder = make_encoder(feature_norm="l2")
    norms = encoder.feature_tables["image"].norm(dim=1)
    present = encoder.present_image
    torch.testing.assert_close(norms[present], torch.ones(int(present.sum())))
    assert torch.all(norms[~present] == 0)
    raw = make_encoder(feature_norm="none").feature_tables["image"]
    torch.testing.assert_close(encoder.feature_tables["image"][present], F.normalize(raw[present], dim=1))


def test_masking_zeroes_the_projected_embedding_bias_included():
    """Masked means W f + b is gone, bias too (as the authors zero fc_image(image_embeddings))."""
    encoder = make_encoder(fusion="sum")
    with torch.no_grad():
        full = encoder.weight.clone()
        with encoder.masking(["image"]):
            assert encoder.masked_modalities == {"image"}
            image_masked = encoder.weight.clone()
            assert torch.equal(encoder(torch.arange(N_ITEMS)), image_masked)
        assert encoder.masked_modalities == frozenset()
        assert torch.equal(encoder.weight, full)  # restored
        expected = projection(encoder, "image")  # W_v f_v + b_v
        expected[0] = 0
        torch.testing.assert_close(full - image_masked, expected)
        missing = torch.tensor(MISSING_IMAGE)  # no image row: the zero input's bias b_v goes too
        torch.testing.assert_close(
            full[missing] - image_masked[missing], encoder.projections["image"].bias.expand(2, -1)
        )

        with encoder.masking(["image"]), encoder.masking(["text"]):
            assert encoder.masked_modalities == {"image", "text"}
            both = encoder.weight.clone()
        torch.testing.assert_close(both[1:], encoder.id_embedding.weight[1:])


def without(encoder: REVEALItemEncoder, modality: str) -> REVEALItemEncoder:
    """An encoder built without ``modality``, holding ``encoder``'s other weights."""
    kept = tuple(m for m in encoder.modalities if m != modality)
    other = make_encoder(modalities=kept, fusion=encoder.fusion)
    state = {k: v for k, v in encoder.state_dict().items() if modality not in k}
    other.load_state_dict(state)
    return other


@pytest.mark.parametrize("fusion", ["sum", "gated"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_masked_table_equals_the_encoder_without_that_modality(fusion, modality):
    """gated: the masked part gets no share of the softmax (it is not a zero vector taking weight)."""
    encoder = make_encoder(fusion=fusion)
    with torch.no_grad():
        with encoder.masking([modality]):
            masked = encoder.weight.clone()
        torch.testing.assert_close(masked, without(encoder, modality).weight)
        if fusion == "gated":
            with encoder.masking(["image", "text"]):
                torch.testing.assert_close(encoder.weight[1:], encoder.id_embedding.weight[1:])


def test_gated_by_hand():
    encoder = make_encoder(fusion="gated")
    with torch.no_grad():
        parts = [encoder.id_embedding.weight, projection(encoder, "image"), projection(encoder, "text")]
        heads = [encoder.gate_heads[n] for n in ("id", "image", "text")]
        for item in range(1, N_ITEMS):
            logits = torch.stack([h(p[item]).squeeze() for h, p in zip(heads, parts)])
            weights = logits.exp() / logits.exp().sum()
            torch.testing.assert_close(encoder.weight[item], sum(w * p[item] for w, p in zip(weights, parts)))
            with encoder.masking(["text"]):
                two = logits[:2].exp() / logits[:2].exp().sum()
                torch.testing.assert_close(encoder.weight[item], two[0] * parts[0][item] + two[1] * parts[1][item])


def moe_by_hand(moe, parts: list[torch.Tensor]) -> torch.Tensor:
    """The authors' M3SRec fusion for one item: row vectors, explicit sums over experts."""
    def mix(experts, router, expert_input, router_input):
        weights = torch.softmax(router(router_input), dim=-1)
        return sum(weights[j] * expert(expert_input) for j, expert in enumerate(experts))

    x = torch.cat(parts)
    shared = mix(moe.shared_experts, moe.shared_router, x, x)
    outputs = [mix(moe.experts[n], moe.routers[n], p + shared, p) for n, p in zip(moe.names, parts)] + [shared]
    attention = torch.softmax(moe.attention(torch.cat(outputs)), dim=-1)
    return sum(parts) + sum(a * o for a, o in zip(attention, outputs))


def test_moe_fusion_by_hand_and_masked_like_the_authors():
    encoder = make_encoder(fusion="moe")
    moe = encoder.moe
    assert len(moe.shared_experts) == 2 and all(len(e) == 4 for e in moe.experts.values())
    assert moe.routers["image"][0].out_features == DIM // 4 and moe.routers["image"][0].bias is None
    with torch.no_grad():
        parts = [encoder.id_embedding.weight, projection(encoder, "image"), projection(encoder, "text")]
        table = encoder.weight
        with encoder.masking(["image"]):
            masked = encoder.weight.clone()
        for item in range(1, N_ITEMS):
            torch.testing.assert_close(table[item], moe_by_hand(moe, [p[item] for p in parts]))
            zero_image = [parts[0][item], torch.zeros(DIM), parts[2][item]]  # the experts run on the zero vector
            torch.testing.assert_close(masked[item], moe_by_hand(moe, zero_image))
        assert torch.count_nonzero(table[0]) == 0


def test_score_with_id_scores_with_the_id_table_and_embeds_inputs_fused():
    fused = make_encoder(fusion="sum")
    by_id = make_encoder(fusion="sum", score_with="id")
    ids = torch.tensor([[1, 4, 0], [11, 2, 3]])
    with torch.no_grad():
        assert by_id.weight is by_id.id_embedding.weight
        torch.testing.assert_close(by_id(ids), fused(ids))  # the input sequence still sees the features
        assert torch.equal(by_id.table(), fused.weight)
        assert not torch.equal(by_id.weight, fused.weight)


def test_id_dropout_zeroes_whole_id_rows_in_training_only():
    n_items = 4000
    encoder = make_encoder(fusion="sum", id_dropout=0.25, n_items=n_items)
    with torch.no_grad():
        reference = make_encoder(fusion="sum", n_items=n_items)
        torch.testing.assert_close(encoder.weight, reference.weight)  # eval: every ID is there
        features_only = reference.weight - reference.id_embedding.weight
        features_only[0] = 0
        encoder.train()
        torch.manual_seed(1)
        table = encoder.weight
        assert torch.count_nonzero(table[0]) == 0  # padding stays zero
        full_rows = torch.isclose(table, reference.weight, atol=1e-6).all(1)
        dropped_rows = torch.isclose(table, features_only, atol=1e-6).all(1)
        assert bool((full_rows | dropped_rows)[1:].all())  # each row: its ID whole, or none of it
        assert abs(float(dropped_rows[1:].float().mean()) - 0.25) < 0.03
        torch.manual_seed(1)
        assert torch.equal(encoder.weight, table)  # one draw per table: the same seed, the same rows
        encoder.eval()
        torch.testing.assert_close(encoder.weight, reference.weight)


def test_id_dropout_takes_a_dropped_id_out_of_the_gate():
    encoder = make_encoder(fusion="gated", id_dropout=0.5).train()
    with torch.no_grad():
        torch.manual_seed(3)
        table = encoder.weight
        torch.manual_seed(3)
        kept = torch.rand(N_ITEMS) >= 0.5  # the encoder's own draw
        assert 0 < int(kept[1:].sum()) < N_ITEMS - 1
        full = encoder.eval().weight
        image, text = projection(encoder, "image"), projection(encoder, "text")
        for item in range(1, N_ITEMS):
            if kept[item]:
                torch.testing.assert_close(table[item], full[item])
            else:  # softmax over image and text alone
                logits = torch.cat([encoder.gate_heads["image"](image[item]), encoder.gate_heads["text"](text[item])])
                w = torch.softmax(logits, 0)
                torch.testing.assert_close(table[item], w[0] * image[item] + w[1] * text[item])


def test_masking_restores_after_an_error_and_rejects_unknown_modalities():
    encoder = make_encoder()
    with pytest.raises(RuntimeError):
        with encoder.masking(["image"]):
            raise RuntimeError("boom")
    assert encoder.masked_modalities == frozenset()
    with pytest.raises(KeyError, match="audio"):
        with encoder.masking(["audio"]):
            pass


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("trainable", [True, False])
def test_fusion_shapes_and_gradients(fusion, trainable):
    encoder = make_encoder(fusion=fusion, feature_trainable=trainable).train()
    table = encoder.weight
    assert table.shape == (encoder.num_embeddings, DIM)
    (table.pow(2).sum() + encoder(torch.tensor([[1, 2, 3]])).sum()).backward()
    for modality in ("image", "text"):
        feature_table = encoder.feature_tables[modality]
        assert feature_table.requires_grad is trainable
        if trainable:
            assert feature_table.grad is not None and torch.count_nonzero(feature_table.grad) > 0
        else:
            assert feature_table.grad is None
        assert encoder.projections[modality].weight.grad is not None
    assert encoder.id_embedding.weight.grad is not None
    if fusion == "gated":
        assert all(head.weight.grad is not None for head in encoder.gate_heads.values())
    if fusion == "moe":
        assert all(p.grad is not None for p in encoder.moe.parameters())


def test_learned_missing_vector_stands_in_for_missing_rows():
    encoder = make_encoder(fusion="sum", missing_feature="learned", feature_norm="none")
    with torch.no_grad():
        encoder.missing_vectors["image"].copy_(torch.randn(IMAGE_DIM))
        vector = encoder.missing_vectors["image"]
        inputs = encoder.modality_input("image")
        present = encoder.present_image
        assert torch.equal(inputs[~present], vector.expand(int((~present).sum()), -1))
        assert torch.equal(inputs[present], encoder.feature_tables["image"][present])
        table = encoder.weight
        for item in MISSING_IMAGE:
            expected = (
                encoder.id_embedding.weight[item]
                + encoder.projections["image"](vector)
                + projection(encoder, "text")[item]
            )
            torch.testing.assert_close(table[item], expected)
    encoder.train()
    encoder.weight[list(MISSING_IMAGE)].sum().backward()
    assert torch.count_nonzero(encoder.missing_vectors["image"].grad) > 0
    assert "text" in encoder.missing_vectors  # every modality gets one


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("trainable", [True, False])
def test_modality_parameters_are_exactly_that_branch(fusion, trainable):
    encoder = make_encoder(fusion=fusion, feature_trainable=trainable)
    expected = [*encoder.projections["image"].parameters()]
    if trainable:
        expected.append(encoder.feature_tables["image"])
    if fusion == "gated":
        expected.extend(encoder.gate_heads["image"].parameters())
    if fusion == "moe":  # the authors' experts_task2_* and dnn2_*, which their AVL scales by K_v
        expected.extend([*encoder.moe.experts["image"].parameters(), *encoder.moe.routers["image"].parameters()])
    got = encoder.modality_parameters("image")
    assert {id(p) for p in got} == {id(p) for p in expected}
    assert len(got) == len(expected)
    others = [encoder.id_embedding.weight, encoder.feature_tables["text"], *encoder.projections["text"].parameters()]
    if fusion == "gated":
        others.extend([*encoder.gate_heads["text"].parameters(), *encoder.gate_heads["id"].parameters()])
    if fusion == "concat":
        others.extend(encoder.concat_projection.parameters())
    if fusion == "moe":
        moe = encoder.moe
        others.extend([*moe.shared_experts.parameters(), *moe.shared_router.parameters(), *moe.attention.parameters()])
        for name in ("id", "text"):
            others.extend([*moe.experts[name].parameters(), *moe.routers[name].parameters()])
        trained = [p for p in encoder.parameters() if p.requires_grad]
        assert len(got) + len([p for p in others if p.requires_grad]) == len(trained)  # nothing left out
    assert not {id(p) for p in got} & {id(p) for p in others}
    with pytest.raises(KeyError):
        encoder.modality_parameters("audio")


def test_modality_parameters_include_the_learned_missing_vector():
    encoder = make_encoder(missing_feature="learned")
    got = {id(p) for p in encoder.modality_parameters("image")}
    assert id(encoder.missing_vectors["image"]) in got
    assert id(encoder.missing_vectors["text"]) not in got


def test_no_grad_cache_reused_then_invalidated_by_inplace_update():
    encoder = make_encoder()
    with torch.no_grad():
        first = encoder.weight
        assert encoder.weight is first  # cached while nothing changes
        encoder.projections["image"].weight.add_(1.0)
        second = encoder.weight
        assert second is not first and not torch.equal(second, first)
        torch.testing.assert_close(second, encoder.compute_table())
        with encoder.masking(["text"]):
            assert not torch.equal(encoder.weight, second)  # masking is part of the cache key
        assert torch.equal(encoder.weight, second)


def test_cache_follows_the_model_to_a_new_dtype_or_device():
    """``.to(device)`` replaces every tensor and keeps its version: the cached table must not survive it
    (a CPU table handed to a model on the GPU); ``.double()`` is the same replacement on a CPU."""
    encoder = make_encoder()
    with torch.no_grad():
        assert encoder.weight.dtype == torch.float32
        encoder.double()
        table = encoder.weight
    assert table.dtype == torch.float64
    torch.testing.assert_close(table, encoder.compute_table())


def test_cache_invalidated_by_load_state_dict():
    encoder = make_encoder(missing_feature="learned")
    other = make_encoder(missing_feature="learned")
    with torch.no_grad():
        other.projections["text"].bias.add_(1.0)
        other.missing_vectors["image"].add_(1.0)
        other.present_image[1:6] = False  # a buffer: not covered by parameter versions
        before = encoder.weight
        encoder.load_state_dict(other.state_dict())
        after = encoder.weight
        assert not torch.equal(after, before)
        torch.testing.assert_close(after, other.weight)
        torch.testing.assert_close(after, encoder.compute_table())


def test_grad_mode_never_returns_a_stale_table():
    encoder = make_encoder().train()
    first = encoder.weight
    assert first.requires_grad
    with torch.no_grad():
        encoder.projections["text"].weight.mul_(2.0)
    torch.testing.assert_close(encoder.weight, encoder.compute_table())


def test_shared_table_computes_once_per_block():
    encoder = make_encoder().train()
    with encoder.shared_table():
        assert encoder.weight is encoder.weight
    assert encoder._table_cache is None  # freed after a training block


def test_rows_fit_a_larger_id_table():
    """BERT4Rec's table has one extra (mask-token) row: it gets no feature."""
    bigger = REVEALItemEncoder(
        nn.Embedding(N_ITEMS + 1, DIM, padding_idx=0), {"image": random_features(N_ITEMS, IMAGE_DIM, seed=1)}
    )
    assert bigger.weight.shape == (N_ITEMS + 1, DIM)
    assert not bool(bigger.present_image[N_ITEMS])
    assert torch.count_nonzero(bigger.feature_tables["image"][N_ITEMS]) == 0


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"fusion": "mean"}, "fusion"), ({"missing_feature": "mean"}, "missing_feature"),
        ({"feature_norm": "l1"}, "feature_norm"), ({"score_with": "image"}, "score_with"),
        ({"id_dropout": 1.0}, "id_dropout"), ({"id_dropout": -0.1}, "id_dropout"),
        ({"id_dropout": "0.1"}, "id_dropout"), ({"id_dropout": 0.1, "modalities": ()}, "id_dropout needs"),
        ({"fusion": "moe", "moe_shared_experts": 0}, "moe_shared"),
        ({"fusion": "moe", "moe_specific_experts": 2.5}, "moe_specific"),
        ({"fusion": "moe", "moe_low_rank": True}, "moe_low"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        make_encoder(**kwargs)


# ------------------------------------------------------------------ in a REVEAL model
def test_score_with_id_in_a_model_scores_ce_full_ranking_and_predict_with_the_id_table(tiny_config):
    from test_avl import NO_DROPOUT, build

    settings = {"avl": False, "score_with": "id", "feature_neighbours": False}  # the product alone, no added term
    _, model, _, train_data, *_ = build(tiny_config | NO_DROPOUT | settings)
    model.eval()
    batch = next(iter(train_data))
    id_table = model.item_embedding.id_embedding.weight
    with torch.no_grad():
        seq_output = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])  # inputs embedded fused
        fused_inputs = F.embedding(batch[model.ITEM_SEQ], model.item_embedding.table())
        assert torch.equal(model.item_embedding(batch[model.ITEM_SEQ]), fused_inputs)
        torch.testing.assert_close(
            model.calculate_loss(batch), F.cross_entropy(seq_output @ id_table.T, batch[model.POS_ITEM_ID])
        )
        torch.testing.assert_close(model.full_sort_predict(batch), seq_output @ id_table.T)
        expected = (seq_output * id_table[batch[model.ITEM_ID]]).sum(-1)
        torch.testing.assert_close(model.predict(batch), expected)


def test_score_with_id_refuses_bpr(tiny_config):
    from test_avl import build

    bpr = {"loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}}
    with pytest.raises(ConfigError, match="score_with: id needs loss_type: CE"):
        build(tiny_config | bpr | {"score_with": "id"})
    build(tiny_config | bpr | {"score_with": "id", "modalities": []})  # no features: the ID table is the table


def test_a_saved_config_without_the_newer_keys_gets_their_defaults():
    from reveal_recbole.model.item_encoder import SETTING_DEFAULTS, encoder_settings

    old_config = {"loss_type": "CE"}
    config = type("C", (), {"__getitem__": lambda self, k: old_config.get(k)})()
    assert encoder_settings(config, ["image"]) == SETTING_DEFAULTS


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("missing_feature", ["zero", "learned"])
def test_score_with_id_fuses_only_the_rows_it_embeds(fusion, missing_feature):
    """The input sequence's rows, computed alone, equal the full table's; the catalogue is not projected."""
    encoder = make_encoder(fusion=fusion, score_with="id", missing_feature=missing_feature)
    ids = torch.tensor([[1, 4, 0, 4], [11, 3, 7, 0]])  # repeats, padding, items without an image row
    inputs = []
    hook = encoder.projections["image"].register_forward_hook(lambda _, args, __: inputs.append(args[0].shape[0]))
    with torch.no_grad():
        rows = encoder(ids)
        torch.testing.assert_close(rows, encoder.table()[ids])
        with encoder.masking(["image"]):
            torch.testing.assert_close(encoder(ids), encoder.table()[ids])
    hook.remove()
    assert inputs[0] == 6  # the distinct ids of the batch, not the N_ITEMS rows of the catalogue
    assert torch.count_nonzero(rows[ids == 0]) == 0
    encoder.train()
    encoder(ids).sum().backward()  # the projections learn from the rows they embedded
    assert encoder.projections["text"].weight.grad.abs().sum() > 0
