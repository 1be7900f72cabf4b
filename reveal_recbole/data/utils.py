"""``create_dataset``: file checks first, then RecBole's own construction and caching, then the cold-item hold-out."""
from __future__ import annotations

from logging import getLogger

from recbole.data import create_dataset as recbole_create_dataset

from reveal_recbole import recbole_seam
from reveal_recbole.data.cold_start import hold_out_cold_items
from reveal_recbole.data.dataset import (
    MultimodalSequentialDataset,
    require_dataset_files,
    users_with_one_interaction,
)
from reveal_recbole.errors import ConfigError
from reveal_recbole.prepare import prepare_missing
from reveal_recbole.registry import get_dataset_class


def create_dataset(config):
    """Prepare a missing dataset that has a raw source (``download: auto``, ``reveal_recbole.prepare``), check
    its files (never RecBole's download attempt), then build it the RecBole way."""
    multimodal = issubclass(get_dataset_class(config), MultimodalSequentialDataset)
    prepare_missing(config, multimodal)
    if not multimodal:
        require_dataset_files(config, multimodal=False)  # the multimodal class runs these checks itself
    with recbole_seam.dataset_class_in_use(config["model"], get_dataset_class(config)):  # ours, where RecBole's name
        dataset = recbole_create_dataset(config)
    apply_cold_item_share(dataset, config)  # before RecBole's split, so every model sees the same cold split
    largest_k = max(config["topk"])  # RecBole's Config has made it a list of positive integers
    if largest_k > dataset.item_num - 1:
        raise ConfigError(
            f"topk {config['topk']} asks for the top {largest_k} items, but {config['dataset']} has only "
            f"{dataset.item_num - 1}: lower topk (e.g. --topk=[5,10])"
        )
    single = users_with_one_interaction(dataset)
    if single:
        getLogger().warning(
            f"{config['dataset']}: {single} user(s) have a single interaction: no training sequence and no "
            "evaluation target comes from them "
            "(filter them with user_inter_num_interval: \"[2,inf)\" or dataset_prep's k-core)"
        )
    return dataset


def apply_cold_item_share(dataset, config):
    """``cold_item_share``: hold items out of training (:func:`hold_out_cold_items`) and say so; None when 0."""
    cold = hold_out_cold_items(dataset, config)
    if cold is not None:
        getLogger().info(
            f"cold_item_share {config['cold_item_share']}: {len(cold.cold_items)} of {dataset.item_num - 1} items held "
            f"out of training (seed {config['seed']}); {cold.dropped} training interactions with them dropped; "
            "they are "
            f"the test target of {cold.cold_test_targets} of {cold.test_targets} users and the validation target of "
            f"{cold.cold_valid_targets}"
        )
    return cold
