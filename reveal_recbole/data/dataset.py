"""The multimodal sequential dataset, and dataset checks that run before RecBole touches files."""
from __future__ import annotations

from logging import getLogger
from pathlib import Path

from recbole.data.dataset import SequentialDataset
from recbole.utils import FeatureType

from reveal_recbole.config import known_datasets
from reveal_recbole.data.features import ItemFeatures, feature_paths, load_item_features
from reveal_recbole.data.sources import download_mode, manual_commands, raw_source
from reveal_recbole.errors import ConfigError, DatasetFileError, DatasetNotPreparedError


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


def missing_files(config, multimodal: bool) -> list[Path]:
    return [f for f in required_files(config, multimodal) if not f.is_file()]


def require_dataset_files(config, multimodal: bool) -> None:
    """Fail at once, naming missing files and how to make them, instead of RecBole's download attempt;
    then check the interaction file (before RecBole, whose pandas errors name neither line nor column,
    and which fills a missing value with the column mean)."""
    missing = missing_files(config, multimodal)
    if not missing:
        check_interaction_file(config)
        return
    name = config["dataset"]
    known = known_datasets()
    source = raw_source(config)
    if name not in known and source is None and not Path(config["data_path"]).is_dir():
        raise DatasetNotPreparedError(
            f"unknown dataset {name!r}: no folder {config['data_path']} and no properties/dataset/{name}.yaml. "
            f"Known datasets: {', '.join(f'{k} ({v})' for k, v in known.items())}, and amazon2014-<Category> / "
            "amazon2018-<Category> (README \"Datasets\"). "
            "For your own data, set data_path to a folder holding <dataset>.inter (RecBole atomic format)."
        )
    reason = "download: never" if source is not None and download_mode(config) == "never" else ""
    raise not_prepared_error(config, multimodal, missing, reason)


def not_prepared_error(config, multimodal: bool, missing: list[Path], reason: str = "") -> DatasetNotPreparedError:
    """``dataset X is not prepared (reason): missing ...; make them with: <commands>``: the commands that fetch
    and prepare a dataset with a raw source (``sources.manual_commands``), then the yaml's ``prepare_commands``."""
    source = raw_source(config)
    steps = manual_commands(source, configured_modalities(config) if multimodal else None) if source else []
    steps += config["prepare_commands"] or []
    how = ("\n  make them with:\n    " + "\n    ".join(steps)) if steps else ""
    return DatasetNotPreparedError(
        f"dataset {config['dataset']!r} is not prepared{f' ({reason})' if reason else ''}: missing\n    "
        + "\n    ".join(map(str, missing)) + how
    )


FEATURE_TYPES = tuple(kind.value for kind in FeatureType)


def interaction_file(config) -> Path:
    return Path(config["data_path"]) / f"{config['dataset']}.inter"


def _header_fields(path: Path, config) -> dict[str, str]:
    """``name -> type`` of the header; a column that is not ``name:<RecBole type>`` is an error."""
    with open(path, encoding=config["encoding"] or "utf-8", errors="replace") as handle:
        header = handle.readline().rstrip("\r\n")
    fields = {}
    for column, entry in enumerate(header.split(config["field_separator"] or "\t"), start=1):
        name, colon, kind = entry.partition(":")
        if not colon or not name or kind not in FEATURE_TYPES:
            raise DatasetFileError(
                f"{path}: header column {column} is {entry!r}, not name:type with type one of "
                f"{', '.join(FEATURE_TYPES)} "
                "(columns are tab-separated, e.g. user_id:token item_id:token timestamp:float)"
            )
        fields[name] = kind
    return fields


def check_interaction_file(config) -> None:
    """The ``.inter`` header has the user, item and time columns the config loads, with usable types,
    and every line is complete (one pass over the file: about 1 s per million lines)."""
    path = interaction_file(config)
    fields = _header_fields(path, config)
    user, item, time = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["TIME_FIELD"]
    needed = [user, item, *((config["load_col"] or {}).get("inter") or [])]
    if (config["eval_args"] or {}).get("order") == "TO":
        needed.append(time)
    missing = [name for name in dict.fromkeys(needed) if name not in fields]
    if missing:
        raise DatasetFileError(
            f"{path}: missing column(s) {', '.join(missing)} (the config loads them: USER_ID_FIELD, ITEM_ID_FIELD, "
            f"load_col, and TIME_FIELD for the chronological split); the header has {', '.join(fields) or 'nothing'}"
        )
    if time in fields and fields[time] != "float":
        raise DatasetFileError(
            f"{path}: column {time} is {fields[time]}; timestamps must be float (write {time}:float)"
        )
    problem = find_bad_interaction_line(path, fields, config)
    if problem:
        raise DatasetFileError(problem)


def find_bad_interaction_line(path: Path, fields: dict[str, str], config) -> str | None:
    """The first line of ``path`` (header ``fields``) with too few columns, an empty user, item or
    float value, or a float value that is not a number (None if every line is fine).

    Lines with more columns than the header are read as RecBole reads them (the header's columns;
    the rest ignored: RecBole's own ``tests/test_data/test/test.inter`` has such a line) and
    reported in one warning.
    """
    columns = list(fields.items())
    separator = config["field_separator"] or "\t"
    required = {config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]}
    surplus, first_surplus = 0, None
    with open(path, encoding=config["encoding"] or "utf-8", errors="replace") as handle:
        next(handle)
        for number, line in enumerate(handle, start=2):
            values = line.rstrip("\r\n").split(separator)
            if len(values) < len(columns):
                return f"{path} line {number}: {len(values)} columns, the header has {len(columns)}"
            if len(values) > len(columns):
                surplus += 1
                first_surplus = first_surplus or (number, len(values))
            for (name, kind), value in zip(columns, values):
                if not value.strip() and (name in required or kind == "float"):
                    return f"{path} line {number}: empty {name}"
                if kind == "float":
                    try:
                        float(value)
                    except ValueError:
                        return f"{path} line {number}: {name} is {value[:40]!r}, not a number"
    if surplus:
        getLogger().warning(
            f"{path}: {surplus} line(s) have more columns than the header's {len(columns)} (first: line "
            f"{first_surplus[0]}, {first_surplus[1]} columns); read as RecBole reads them, the extra values ignored"
        )
    return None


def users_with_one_interaction(dataset) -> int:
    return sum(1 for count in dataset.counter(dataset.uid_field).values() if count < 2)


class MultimodalSequentialDataset(SequentialDataset):
    """RecBole's SequentialDataset plus ``item_features``: per-modality tables aligned to internal item ids."""

    item_features: dict[str, ItemFeatures]

    def __init__(self, config):
        require_dataset_files(config, multimodal=True)
        super().__init__(config)
        self.item_features = load_item_features(
            feature_dir(config),
            config["dataset"],
            configured_modalities(config),
            self.field2token_id[self.iid_field],
            self.item_num,
            strict=config["strict_feature_items"],
            normalise=config["feature_norm"] == "l2",  # once, here: frozen encoder tables then share these rows
        )

    def set_item_features(self, modality: str, features: ItemFeatures) -> None:
        """Give ``modality`` these aligned rows (FVE attaches each round's image features so)."""
        self.item_features = {**self.item_features, modality: features}

    def _download(self):
        require_dataset_files(self.config, multimodal=True)

    def __str__(self):
        lines = [super().__str__()]
        for modality, features in self.item_features.items():
            covered = int(features.present[1:].sum())
            lines.append(f"{modality} features: {features.dim}-d, {covered}/{self.item_num - 1} items")
        return "\n".join(lines)
