"""Item features as RecBole item fields: what RecBole's feature-aware sequential models read.

SASRecF, FDSA and GRU4RecF embed the item fields named in ``selected_features``. Here each
configured modality ``m`` (``modalities``, as for every model that reads features) becomes the
``float_seq`` item field ``<m>_feature``: row ``i`` of ``item_feat`` is the feature row of internal
item ``i``, the very tensor :class:`MultimodalSequentialDataset` loaded and aligned by item token
(``item_features[m].values``, shared, not copied): same rows, same ``feature_norm``, zeros for
items without a row, as the REVEAL models see them. No ``.item`` file is written or needed.

The fields are added when RecBole turns its tables into tensors (``_change_feat_format``, at
``build``), straight as tensors: no pandas round trip of ``items x dim`` Python floats.
"""
from __future__ import annotations

import torch
from recbole.data.interaction import Interaction
from recbole.utils import FeatureSource, FeatureType

from reveal_recbole.data.dataset import MultimodalSequentialDataset, configured_modalities
from reveal_recbole.errors import ConfigError

FIELD_SUFFIX = "_feature"


def feature_field(modality: str) -> str:
    """The item field that holds ``modality``'s feature rows: ``image`` -> ``image_feature``."""
    return modality + FIELD_SUFFIX


def feature_fields(config) -> list[str]:
    """The item fields of the configured ``modalities``, in order."""
    return [feature_field(m) for m in configured_modalities(config)]


def selected_features(config) -> list[str]:
    """``selected_features`` as a list; ``~`` (the default of the feature peers' yaml) = every modality's field."""
    value = config["selected_features"]
    if value is None:
        fields = feature_fields(config)
        if not fields:
            raise ConfigError(
                f"{config['model']} reads item fields and none is set: give modalities (e.g. [image, text]) "
                "or name .item fields in selected_features"
            )
        return fields
    if isinstance(value, str):  # RecBole's command line leaves --selected_features=[a,b] a string
        value = [name.strip() for name in value.strip("[] ").split(",") if name.strip()]
    return list(value)


class FeatureFieldsDataset(MultimodalSequentialDataset):
    """:class:`MultimodalSequentialDataset` whose features are also ``float_seq`` item fields ``<modality>_feature``.

    With no ``modalities`` (RecBole's own config for SASRecF and the like) it adds no field: the
    ``.item`` file's fields are what the model reads, as in RecBole.
    """

    feature_field_names: frozenset[str] = frozenset()  # the item fields this class made (set again each round)

    def _change_feat_format(self):
        super()._change_feat_format()
        self.add_feature_fields()

    def add_feature_fields(self) -> None:
        """Add each modality's ``(item_num, dim)`` table to ``item_feat`` as a ``float_seq`` item field."""
        self.put_feature_fields({feature_field(m): features.values for m, features in self.item_features.items()})

    def set_item_features(self, modality: str, features) -> None:
        """The modality's rows, and its item field with them (the field is what the model embeds)."""
        self.put_feature_fields({feature_field(modality): features.values})  # refused before anything changes
        super().set_item_features(modality, features)

    def put_feature_fields(self, tables: dict[str, torch.Tensor]) -> None:
        """Set these ``float_seq`` item fields, adding the ones ``item_feat`` lacks; a field of the ``.item``
        file by the same name is refused, never overwritten.

        ``item_feat`` is shared by the splits RecBole copies from this dataset, so each sees them.
        """
        if not tables:
            return
        clash = [f for f in tables if f in self.field2type and f not in self.feature_field_names]
        if clash:
            raise ConfigError(
                f"{self.dataset_name}: the .item file already has field(s) {clash}, the names the "
                f"{', '.join(f.removesuffix(FIELD_SUFFIX) for f in clash)} features take: "
                "rename or unload those columns"
            )
        self.feature_field_names = self.feature_field_names | set(tables)
        for field, values in tables.items():
            self.field2type[field] = FeatureType.FLOAT_SEQ
            self.field2source[field] = FeatureSource.ITEM
            self.field2seqlen[field] = values.shape[1]
        if self.item_feat is None:
            self.item_feat = Interaction({self.iid_field: torch.arange(self.item_num), **tables})
        else:
            self.item_feat.update(Interaction(tables))


__all__ = ["FIELD_SUFFIX", "FeatureFieldsDataset", "feature_field", "feature_fields", "selected_features"]
