"""Every sequential model RecBole ships, as a REVEAL backbone: it works or it is refused clearly.

"Works" means: the REVEAL version builds on the tiny Scientific subset, changing one item's image
feature changes (i) that item's own score column for a user who never saw it and (ii) the scores
of a user whose input sequence ends with it, and one AVL training step has a finite loss and
reaches the image branch. "Refused" means one ``BackboneError`` whose message names the backbone
and what stands in the way. The tables below are the measured status for RecBole 1.2.1 (README
"Any backbone"); a model a later RecBole adds fails ``test_every_recbole_model_has_an_outcome``
until it is classified here, so none is skipped silently.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.sequential_recommender import SASRec
from torch import nn

import reveal_recbole
from reveal_recbole import Config, get_model, make_reveal_model, registered_models
from reveal_recbole.errors import BackboneError, UserInputError
from reveal_recbole.model import REVEALRecommender
from reveal_recbole.pipeline import build_model, prepare_data
from reveal_recbole.trainer.avl import AdaptiveVisualLearning

from conftest import DATASET

CE, BPR = "CE", "BPR"

# Backbones that work, with the loss types the backbone itself supports: CORE and the CPR models
# are CE-only (the CPR models exit the process on BPR), TransRec is BPR-only.
WORKS = {
    "BERT4Rec": (CE, BPR), "CORE": (CE,), "Caser": (CE, BPR), "FEARec": (CE, BPR), "FOSSIL": (CE, BPR),
    "GCSAN": (CE, BPR), "GRU4Rec": (CE, BPR), "GRU4RecCPR": (CE,), "HRM": (CE, BPR), "LightSANs": (CE, BPR),
    "NARM": (CE, BPR), "NPE": (CE, BPR), "NextItNet": (CE, BPR), "SASRec": (CE, BPR), "SASRecCPR": (CE,),
    "SHAN": (CE, BPR), "SINE": (CE, BPR), "SRGNN": (CE, BPR), "STAMP": (CE, BPR), "TransRec": (BPR,),
    # these embed item attribute fields too: they work when the dataset has one (ITEM_FIELD below)
    "FDSA": (CE, BPR), "GRU4RecF": (CE, BPR), "SASRecF": (CE, BPR),
}
NEEDS_ITEM_FIELD = {"FDSA", "GRU4RecF", "SASRecF"}  # refused on interaction-only data, by the field
# Refused by make_reveal_model, from the class alone (before any data): words the message holds
REFUSED = {
    "DIEN": "no `item_embedding`",
    "DIN": "no `item_embedding`",
    "FPMC": "IU_emb, LI_emb, IL_emb",
    "RepeatNet": "item_matrix",
    "HGN": "item_embedding_for_prediction",
    "GRU4RecKG": "GRU4RecKGDataset",
    "KSR": "KSRDataset",
    "S3Rec": "S3RecTrainer",
}
OVERRIDES = {"FEARec": {"n_layers": 2}}  # FEARec's hybrid attention divides by n_layers - 1
# An item attribute field from the bundled scientific.item, for the backbones that embed one
ITEM_FIELD = {
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "categories"]},
    "selected_features": ["categories"],
}


def recbole_sequential_models() -> list[str]:
    """Every SequentialRecommender defined in RecBole's sequential_recommender package, found by import."""
    package = importlib.import_module("recbole.model.sequential_recommender")
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, SequentialRecommender) and cls.__module__ == module.__name__
                and not issubclass(cls, REVEALRecommender)
            ):
                names.add(name)
    return sorted(names)


def backbone(name: str) -> type:
    return getattr(importlib.import_module("recbole.model.sequential_recommender"), name)


def reveal_class(name: str) -> type:
    """The registered ``<name>REVEAL`` (the package's own for SASRec etc.), built once otherwise."""
    reveal_name = f"{name}REVEAL"
    if reveal_name in registered_models():
        return get_model(reveal_name)
    return make_reveal_model(backbone(name))


def add_item_file(data_path: Path) -> None:
    """The bundled scientific.item, cut to the tiny subset's items, beside its .inter file."""
    folder = Path(data_path) / DATASET
    items = {line.split("\t")[1] for line in (folder / f"{DATASET}.inter").read_text(encoding="utf-8").splitlines()[1:]}
    source = Path(reveal_recbole.__file__).parent / "dataset_example" / DATASET / f"{DATASET}.item"
    lines = source.read_text(encoding="utf-8").splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if line.split("\t", 1)[0] in items]
    (folder / f"{DATASET}.item").write_text("\n".join(kept) + "\n", encoding="utf-8")


def build(name: str, loss: str, tiny_config: dict, **overrides):
    """Config, dataset, split and model for ``<name>REVEAL``, as run_reveal builds them."""
    config_dict = {**tiny_config, "loss_type": loss, **OVERRIDES.get(name, {}), **overrides}
    config = Config(model=reveal_class(name).__name__, dataset=DATASET, config_dict=config_dict)
    _, train_data, _, test_data = prepare_data(config)  # sampling for BPR comes from the loss type
    return build_model(config, train_data), train_data, test_data


def test_every_recbole_model_has_an_outcome():
    found = recbole_sequential_models()
    assert {"SASRec", "GRU4Rec", "BERT4Rec", "NARM", "STAMP"} <= set(found)
    assert set(found) == set(WORKS) | set(REFUSED), "classify new RecBole models in WORKS or REFUSED"
    assert not set(WORKS) & set(REFUSED)


@pytest.mark.parametrize(
    "name, loss", [pytest.param(name, loss, id=f"{name}-{loss}") for name, losses in WORKS.items() for loss in losses]
)
def test_features_reach_the_sequence_and_the_score_column(tiny_config, name, loss):
    if name in NEEDS_ITEM_FIELD:
        add_item_file(tiny_config["data_path"])
    overrides = ITEM_FIELD if name in NEEDS_ITEM_FIELD else {}
    model, train_data, test_data = build(name, loss, tiny_config, **overrides)
    encoder = model.item_embedding

    model.eval()
    interaction = next(iter(test_data))[0]
    sequences, lengths = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    seen = 0  # user 0; the item: the last one of its input sequence (TransRec reads only that one)
    item = int(sequences[seen, lengths[seen] - 1])
    unseen = next(u for u in range(len(sequences)) if not (sequences[u] == item).any())
    with torch.no_grad():
        before = model.full_sort_predict(interaction)
        assert torch.equal(before, model.full_sort_predict(interaction))  # any change below is the feature's
        generator = torch.Generator().manual_seed(0)
        table = encoder.feature_tables["image"]
        table[item] += 10 * torch.randn(table.shape[1], generator=generator)
        after = model.full_sort_predict(interaction)
    assert after.shape == (len(interaction), model.n_items)
    assert after[unseen, item] != before[unseen, item], "the item's own score column ignores its features"
    others = torch.ones(after.shape[1], dtype=torch.bool)
    others[item] = False
    assert (after[seen, others] != before[seen, others]).any(), "the input sequence ignores the item's features"

    model.train()
    avl = AdaptiveVisualLearning(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with avl.gradient_hooks():
        loss_value = avl.training_loss(next(iter(train_data)))
        assert torch.isfinite(loss_value)
        loss_value.backward()
    assert encoder.projections["image"].weight.grad.abs().sum() > 0
    optimizer.step()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_backbone_is_refused_when_the_class_is_built(name):
    with pytest.raises(BackboneError) as excinfo:
        make_reveal_model(backbone(name))
    message = str(excinfo.value)
    assert message.startswith(f"{name} cannot take the REVEAL item encoder")
    assert REFUSED[name] in message
    assert isinstance(excinfo.value, UserInputError)
    assert f"{name}REVEAL" not in registered_models()


@pytest.mark.parametrize("name", sorted(NEEDS_ITEM_FIELD))
def test_item_field_backbone_is_refused_on_interaction_only_data(tiny_config, name):
    with pytest.raises(BackboneError) as excinfo:
        build(name, CE, tiny_config)
    message = str(excinfo.value)
    assert message.startswith(f"{name} needs the item attribute field(s) ['class']")
    assert "selected_features" in message


def test_an_alias_of_the_item_table_is_routed_to_the_encoder(tiny_config):
    """GRU4RecCPR scores through ``out_item_embedding``, bound to the input table: now the encoder."""
    model, _, _ = build("GRU4RecCPR", CE, tiny_config)
    assert model.out_item_embedding is model.item_embedding
    assert model.out_item_embedding.bias is None  # the attribute GRU4RecCPR set on its table, carried over


def test_a_separate_output_table_is_refused(tiny_config):
    with pytest.raises(BackboneError, match=r"GRU4RecCPR .*`out_item_embedding.weight` \(Linear"):
        build("GRU4RecCPR", CE, tiny_config, use_out_emb=True)


class TiedOutputSASRec(SASRec):
    """SASRec scoring through an output layer whose weight is tied to its item table."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.output = nn.Linear(self.hidden_size, self.n_items, bias=False)
        self.output.weight = self.item_embedding.weight

    def full_sort_predict(self, interaction):
        return self.output(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]))


def test_a_weight_tied_to_the_item_table_is_refused(tiny_config):
    """The fused table is computed, not a parameter: a tie to the old weight cannot follow it."""
    make_reveal_model(TiedOutputSASRec)  # nothing in the class alone says so
    sasrec_keys = {  # SASRec's yaml, which Config finds only under SASRec's own name
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "initializer_range": 0.02,
    }
    with pytest.raises(BackboneError, match=r"TiedOutputSASRec .*`output.weight` is tied to `item_embedding.weight`"):
        build("TiedOutputSASRec", CE, tiny_config, **sasrec_keys)
