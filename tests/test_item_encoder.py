"""REVEALItemEncoder: a drop-in ``item_embedding`` fusing ID and projected modality features."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reveal_recbole.model import REVEALItemEncoder

from conftest import random_features

N_ITEMS, DIM, IMAGE_DIM, TEXT_DIM = 12, 8, 6, 5
MISSING_IMAGE = (3, 7)  # items without an image feature row
FUSIONS = ("sum", "concat", "gated")


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


def test_masking_image_removes_only_the_image_projection():
    encoder = make_encoder(fusion="sum")
    with torch.no_grad():
        full = encoder.weight.clone()
        with encoder.masking(["image"]):
            assert encoder.masked_modalities == {"image"}
            image_masked = encoder.weight.clone()
            assert torch.equal(encoder(torch.arange(N_ITEMS)), image_masked)
        assert encoder.masked_modalities == frozenset()
        assert torch.equal(encoder.weight, full)  # restored
        layer = encoder.projections["image"]
        expected = projection(encoder, "image") - layer.bias  # W_v f_v: the image input's share
        expected[0] = 0
        torch.testing.assert_close(full - image_masked, expected)
        missing = torch.tensor(MISSING_IMAGE)
        assert torch.equal(full[missing], image_masked[missing])  # no image feature, nothing changes

        with encoder.masking(["text"]):
            text_masked = encoder.weight.clone()
        expected_text = projection(encoder, "text") - encoder.projections["text"].bias
        expected_text[0] = 0
        torch.testing.assert_close(full - text_masked, expected_text)

        with encoder.masking(["image"]), encoder.masking(["text"]):
            assert encoder.masked_modalities == {"image", "text"}
            both = encoder.weight.clone()
        bias = encoder.projections["image"].bias + encoder.projections["text"].bias
        torch.testing.assert_close(both[1:], encoder.id_embedding.weight[1:] + bias)


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
    got = encoder.modality_parameters("image")
    assert {id(p) for p in got} == {id(p) for p in expected}
    assert len(got) == len(expected)
    others = [encoder.id_embedding.weight, encoder.feature_tables["text"], *encoder.projections["text"].parameters()]
    if fusion == "gated":
        others.extend([*encoder.gate_heads["text"].parameters(), *encoder.gate_heads["id"].parameters()])
    if fusion == "concat":
        others.extend(encoder.concat_projection.parameters())
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
    [({"fusion": "mean"}, "fusion"), ({"missing_feature": "mean"}, "missing_feature"), ({"feature_norm": "l1"}, "feature_norm")],
)
def test_bad_settings_raise_value_error(kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_encoder(**kwargs)
