"""The multimodal sequential dataset, and dataset checks that run before RecBole touches files."""
from __future__ import annotations

from pathlib import Path

from recbole.data.dataset import SequentialDataset

from reveal_recbole.config import fill_missing_defaults, known_datasets
from reveal_recbole.errors import ConfigError, DatasetNotPreparedError
from reveal_recbole.data.features import ItemFeatures, feature_paths, load_item_features


def configured_modalities(config) -> list[str]:
    """The ``modalities`` key as a list of names; ``image`` or ``[image,text]`` as a string also work."""
    value = config["modalities"] or []
    if isinstance(value, str):  # RecBole's command line leaves --modalities=[image,text] a string
        value = [name.strip() for name in value.strip("[] ").split(",") if name.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) and m for m in value):
        raise ConfigError(f"modalities must be a list of names such as [image, text], got {config['modalities']!r}")
    return list(value)


def feature_dir(config) -> Path:
    return Path(config["feature_dir"] or config["data_path"])


def required_files(config, multimodal: bool) -> list[Path]:
    """Files a run needs: the interactions, plus one feature pair per modality for REVEAL models."""
    data_path, name = Path(config["data_path"]), config["dataset"]
    files = [data_path / f"{name}.inter"]
    if multimodal:
        for modality in configured_modalities(config):
            files.extend(feature_paths(feature_dir(config), name, modality))
    return files


def require_dataset_files(config, multimodal: bool) -> None:
    """Fail at once, naming missing files and how to make them, instead of RecBole's download attempt."""
    missing = [f for f in required_files(config, multimodal) if not f.is_file()]
    if not missing:
        return
    name = config["dataset"]
    known = known_datasets()
    if name not in known and not Path(config["data_path"]).is_dir():
        raise DatasetNotPreparedError(
            f"unknown dataset {name!r}: no folder {config['data_path']} and no properties/dataset/{name}.yaml. "
            f"Known datasets: {', '.join(f'{k} ({v})' for k, v in known.items())}. "
            "For your own data, set data_path to a folder holding <dataset>.inter (RecBole atomic format)."
        )
    steps = config["prepare_commands"] or []
    how = ("\n  make them with:\n    " + "\n    ".join(steps)) if steps else ""
    raise DatasetNotPreparedError(
        f"dataset {name!r} is not prepared: missing\n    " + "\n    ".join(map(str, missing)) + how
    )


class MultimodalSequentialDataset(SequentialDataset):
    """RecBole's SequentialDataset plus ``item_features``: per-modality tables aligned to internal item ids."""

    item_features: dict[str, ItemFeatures]

    def __init__(self, config):
        fill_missing_defaults(config)
        require_dataset_files(config, multimodal=True)
        super().__init__(config)
        self.item_features = load_item_features(
            feature_dir(config),
            config["dataset"],
            configured_modalities(config),
            self.field2token_id[self.iid_field],
            self.item_num,
            strict=config["strict_feature_items"],
        )

    def _download(self):
        require_dataset_files(self.config, multimodal=True)

    def __str__(self):
        lines = [super().__str__()]
        for modality, features in self.item_features.items():
            covered = int(features.present[1:].sum())
            lines.append(f"{modality} features: {features.dim}-d, {covered}/{self.item_num - 1} items")
        return "\n".join(lines)
