"""``create_dataset`` with file checks first, then RecBole's own construction and caching."""
from __future__ import annotations

from recbole.data import create_dataset as recbole_create_dataset

from reveal_recbole.data.dataset import MultimodalSequentialDataset, require_dataset_files
from reveal_recbole.utils import get_dataset_class


def create_dataset(config):
    """Check the dataset's files (never RecBole's download attempt), then build it the RecBole way."""
    multimodal = issubclass(get_dataset_class(config), MultimodalSequentialDataset)
    require_dataset_files(config, multimodal=multimodal)
    return recbole_create_dataset(config)
