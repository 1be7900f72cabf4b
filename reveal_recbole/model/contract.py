"""The backbone contract: which RecBole sequential models the REVEAL item encoder can wrap.

REVEAL replaces one attribute of a backbone, ``item_embedding``, with its item encoder. Features
then reach everything the backbone does through ``item_embedding(ids)`` (the input sequence) and
``item_embedding.weight`` (each item's own score column). A backbone that embeds or scores items
through anything else (a second item table, another name for the old table, a weight tied to it)
would still run, with features on one side only and ID-only scores on the other: silently wrong.
So each such place is either routed through the encoder or refused with one ``BackboneError``
naming the backbone and the attribute, as early as the information allows:

* :func:`check_backbone` (the class alone, before any data; ``make_reveal_model`` calls it):
  not a ``SequentialRecommender``; no ``item_embedding`` to replace; a RecBole dataset or trainer
  of its own that a REVEAL model would replace; a second item table used outside ``__init__``
  (read from the backbone's source).
* :func:`check_backbone_data` (the dataset, before the backbone builds): item attribute fields the
  backbone reads (``selected_features``, ``item_attribute``) that the dataset lacks.
* :func:`check_item_tables` (the built model, right after the encoder swap): every module or
  parameter with one row per item outside the encoder, and every attribute still bound to the
  original ID table. Aliases are rebound to the encoder (same semantics: "the item table");
  anything else the backbone uses is refused.

Rules are general (discovered from the model and its source) so a new backbone is checked
without an entry here; the only names below are RecBole's config keys that name item fields.
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import textwrap
from dataclasses import dataclass, field

from torch import nn

from reveal_recbole.errors import BackboneError

ITEM_TABLE = "item_embedding"
# RecBole config keys whose values name item attribute fields a backbone embeds (FDSA, SASRecF,
# GRU4RecF: selected_features; S3Rec: item_attribute): the only way to know, before the backbone
# builds, that it needs more than the interactions.
ITEM_FIELD_KEYS = ("selected_features", "item_attribute")
# Names in a constructor's arguments that mean "one row per item" (n_items, dataset.item_num, ...)
_ITEM_COUNT_NAMES = ("n_items", "item_num", "num_item", "n_item")


@dataclass(frozen=True)
class SourceFacts:
    """What a backbone's source says about its attributes (classes between it and RecBole's base).

    ``complete`` is False when some class has no readable source (built at run time): rules that
    need the source are then skipped, and :func:`check_item_tables` treats every table as used.
    """

    assigned: dict[str, ast.expr] = field(default_factory=dict)  # self.<name> = <value> in __init__
    used: frozenset[str] = frozenset()  # self.<name> read in any other method
    config_keys: frozenset[str] = frozenset()  # config["<key>"] read in __init__
    complete: bool = True


def _backbone_name(model_or_class) -> str:
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    return getattr(getattr(cls, "backbone", None), "__name__", None) or cls.__name__


def _own_classes(backbone: type) -> list[type]:
    """The backbone and its bases up to (not including) RecBole's SequentialRecommender."""
    from recbole.model.abstract_recommender import SequentialRecommender

    return [c for c in backbone.__mro__ if issubclass(c, SequentialRecommender) and c is not SequentialRecommender]


@functools.lru_cache(maxsize=None)
def source_facts(backbone: type) -> SourceFacts:
    """Read the backbone's source once: attributes ``__init__`` assigns, attributes other methods read."""
    assigned: dict[str, ast.expr] = {}
    used: set[str] = set()
    config_keys: set[str] = set()
    for cls in reversed(_own_classes(backbone)):  # subclasses last: their assignments win
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            return SourceFacts(complete=False)
        class_def = next(node for node in tree.body if isinstance(node, ast.ClassDef))
        for method in class_def.body:
            if not isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(method):
                if method.name == "__init__":
                    if isinstance(node, (ast.Assign, ast.AnnAssign)):
                        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                        for target in targets:
                            if _is_self_attribute(target):
                                assigned[target.attr] = node.value
                    elif (
                        isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                        and node.value.id == "config" and isinstance(node.slice, ast.Constant)
                    ):
                        config_keys.add(node.slice.value)
                elif _is_self_attribute(node) and isinstance(node.ctx, ast.Load):
                    used.add(node.attr)
    return SourceFacts(assigned, frozenset(used), frozenset(config_keys))


def _is_self_attribute(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


def _callee(value: ast.expr) -> str:
    """``nn.Embedding`` -> ``Embedding``; '' when the value is not a call."""
    if not isinstance(value, ast.Call):
        return ""
    func = value.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _is_item_table(value: ast.expr) -> bool:
    """``nn.Embedding(<item count>, <width other than 1>)``: a learned vector per item."""
    if _callee(value) != "Embedding" or not value.args:
        return False
    rows = ast.unparse(value.args[0])
    width = value.args[1] if len(value.args) > 1 else None
    scalar = isinstance(width, ast.Constant) and width.value == 1  # a per-item bias (TransRec)
    return any(name in rows for name in _ITEM_COUNT_NAMES) and not scalar


def check_backbone(backbone) -> None:
    """Refuse, from the class alone, a backbone whose items cannot all go through the REVEAL encoder.

    Runs before any data work, so an unsupported backbone fails at ``make_reveal_model`` time.
    """
    from recbole.model.abstract_recommender import SequentialRecommender

    if not (isinstance(backbone, type) and issubclass(backbone, SequentialRecommender)):
        raise BackboneError(f"{backbone!r} is not a RecBole SequentialRecommender class")
    name = backbone.__name__
    facts = source_facts(backbone)
    if facts.complete and ITEM_TABLE not in facts.assigned:
        embedders = [
            attr for attr, value in facts.assigned.items()
            if _is_item_table(value) or _callee(value).endswith("EmbLayer")
        ]
        through = f"; it embeds items through {', '.join(embedders)}" if embedders else ""
        raise BackboneError(
            f"{name} cannot take the REVEAL item encoder: it has no `{ITEM_TABLE}` for the encoder "
            f"to replace{through}"
        )
    own_dataset = getattr(importlib.import_module("recbole.data.dataset"), f"{name}Dataset", None)
    if own_dataset is not None:
        raise BackboneError(
            f"{name} cannot take the REVEAL item encoder: it needs RecBole's {own_dataset.__name__} "
            f"(a {own_dataset.__mro__[1].__name__} subclass), which a REVEAL model replaces with "
            "reveal_recbole's MultimodalSequentialDataset"
        )
    own_trainer = getattr(importlib.import_module("recbole.trainer"), f"{name}Trainer", None)
    if own_trainer is not None:
        raise BackboneError(
            f"{name} cannot take the REVEAL item encoder: it trains with RecBole's {own_trainer.__name__} "
            f"(a {own_trainer.__mro__[1].__name__} subclass), which a REVEAL model replaces with REVEALTrainer"
        )
    for attr, value in facts.assigned.items():
        if attr != ITEM_TABLE and attr in facts.used and _is_item_table(value):
            raise BackboneError(
                f"{name} cannot take the REVEAL item encoder: it embeds or scores items through "
                f"`{attr}` ({ast.unparse(value)}) besides `{ITEM_TABLE}`, an ID-only table the "
                "encoder does not replace, so item features would miss part of the model"
            )


def check_backbone_data(backbone: type, config, dataset) -> None:
    """Refuse a backbone that reads item attribute fields the dataset does not have.

    FDSA, SASRecF and GRU4RecF embed ``selected_features``, S3Rec its ``item_attribute``; on
    interaction-only data their constructors fail with a bare ``KeyError``. Runs before the backbone
    builds (the fields are known only once the dataset is loaded).
    """
    keys = [key for key in ITEM_FIELD_KEYS if key in source_facts(backbone).config_keys]
    for key in keys:
        value = config[key]
        fields = [value] if isinstance(value, str) else list(value or [])
        missing = [f for f in fields if f not in dataset.field2type]
        if missing:
            raise BackboneError(
                f"{backbone.__name__} needs the item attribute field(s) {missing} (config `{key}`), "
                f"which dataset {config['dataset']!r} does not have: load them from its .item file "
                f"(load_col: {{item: [item_id, ...]}}) and name them in `{key}`, or pick another backbone"
            )


def item_table(model) -> nn.Embedding:
    """The backbone's ``item_embedding``: the table the encoder replaces (refused when there is none)."""
    table = getattr(model, ITEM_TABLE, None)
    if not isinstance(table, nn.Embedding):
        found = "none" if table is None else type(table).__name__
        raise BackboneError(
            f"{_backbone_name(model)} cannot take the REVEAL item encoder: its `{ITEM_TABLE}` is {found}, "
            "not an nn.Embedding the encoder can replace"
        )
    return table


def check_item_tables(model, dataset=None) -> None:
    """After the swap: route every alias of the old ID table to the encoder; refuse other item tables.

    * An attribute still bound to the original ``nn.Embedding`` (GRU4RecCPR's ``out_item_embedding``
      when it shares the input table) means "the item table": it is rebound to the encoder, with any
      plain attribute the backbone set on the table (``bias = None``) carried over.
    * A parameter tied to the original weight cannot follow: the fused table is computed, not a
      parameter. Refused.
    * A parameter with one row per item (``n_items``, or the encoder's size with a mask token) outside
      the encoder is an ID-only item table (HGN's ``item_embedding_for_prediction``, a
      ``Linear(h, n_items)`` output layer): refused, unless it holds a scalar per item (a popularity
      bias such as BERT4Rec's ``output_bias``: features still reach the score through the embedding
      term), the backbone's source never reads it outside ``__init__`` (NPE's ``embedding_seq_item``),
      or it is a user table that happens to have as many rows as there are items. (A layer whose
      width equals the item count would be a false alarm: a refusal, never a silent pass.)
    """
    encoder = model.item_embedding
    original = encoder.id_embedding
    name = _backbone_name(model)
    inside = {id(m) for m in encoder.modules()}
    modules = [(path, m) for path, m in model.named_modules() if id(m) not in inside]
    for _, module in modules:  # aliases of the old table: registered modules or plain attributes
        for attr, value in list(module._modules.items()) + list(vars(module).items()):
            if value is original:
                _rebind(module, attr, encoder, original)

    item_rows = {model.n_items, encoder.num_embeddings}
    user_rows = getattr(dataset, "user_num", None)
    backbone = getattr(model, "backbone", None)
    facts = source_facts(backbone) if isinstance(backbone, type) else SourceFacts(complete=False)
    for path, module in modules:
        for attr, param in module._parameters.items():
            if param is None:
                continue
            where = f"{path}.{attr}" if path else attr
            if param is original.weight:
                raise BackboneError(
                    f"{name} cannot take the REVEAL item encoder: `{where}` is tied to `{ITEM_TABLE}.weight`, "
                    "and the encoder's fused item table is computed, not a parameter a tie can follow"
                )
            rows = [d for d in param.shape if d in item_rows]
            if not rows or param.numel() == rows[0]:  # no item dimension, or a scalar per item
                continue
            top = where.split(".")[0]
            if "user" in top.lower() and rows[0] == user_rows:
                continue
            if facts.complete and top not in facts.used:
                continue
            raise BackboneError(
                f"{name} cannot take the REVEAL item encoder: it embeds or scores items through `{where}` "
                f"({type(module).__name__}, shape {tuple(param.shape)}: one row per item) besides "
                f"`{ITEM_TABLE}`, an ID-only table the encoder does not replace, so item features would "
                "miss part of the model"
            )


def _rebind(module: nn.Module, attr: str, encoder: nn.Module, original: nn.Embedding) -> None:
    """Point ``module.<attr>`` at the encoder, keeping plain attributes the backbone set on the old table."""
    plain = vars(nn.Embedding(1, 1))
    for key, value in vars(original).items():
        if key not in plain and not hasattr(encoder, key):
            setattr(encoder, key, value)
    setattr(module, attr, encoder)
