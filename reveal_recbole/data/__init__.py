from reveal_recbole.data.dataset import DatasetNotPreparedError, MultimodalSequentialDataset
from reveal_recbole.data.features import (
    FeatureFileError,
    ItemFeatures,
    align_item_features,
    feature_paths,
    load_item_features,
    read_feature_file,
    write_item_features,
)
from reveal_recbole.data.utils import create_dataset

__all__ = [
    "DatasetNotPreparedError",
    "FeatureFileError",
    "ItemFeatures",
    "MultimodalSequentialDataset",
    "align_item_features",
    "create_dataset",
    "feature_paths",
    "load_item_features",
    "read_feature_file",
    "write_item_features",
]
