"""Cold-start items: hold a share of the items out of training, so they appear only as evaluation targets.

RecBole's leave-one-out (``eval_args: split: {LS: valid_and_test}``, chronological) makes each
user's last interaction the test target, the one before it the validation target, and every
earlier one a training interaction (a training target, or the first item of a training
history). ``cold_item_share`` picks that share of the items, deterministically from the seed,
and drops every interaction with them that would be a training interaction, before RecBole
splits: a cold item then occurs only as a validation or test target. Every model reads the
same dataset, so baselines and REVEAL models see the same cold split.

Positions follow RecBole 1.2.1 exactly (``SequentialDataset.data_augmentation`` and
``Dataset._split_index_by_leave_one_out``): a user's interactions are sorted by time, ties in
file order; of ``n`` of them, the last ``min(L, n - 2)`` are evaluation targets (``L`` = 2 for
``valid_and_test``, 1 for ``valid_only`` / ``test_only``), the rest are training. A user with
three interactions therefore has a test target but no validation target, and a user with two
has neither: the last is a training target. So a cold interaction among a user's last two is
kept only while it still sits at an evaluation position once the other cold ones are gone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reveal_recbole.errors import ConfigError

LEAVE_OUT = {"valid_and_test": 2, "valid_only": 1, "test_only": 1}


def check_cold_item_share(value) -> float:
    """``cold_item_share`` as a float in [0, 1); anything else is a ``ConfigError``."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(
            f"cold_item_share must be a number in [0, 1) (the share of items held out of training), got {value!r}"
        )
    return float(value)


def leave_out_count(config) -> int:
    """How many evaluation targets RecBole's split takes from the end of each user's sequence."""
    eval_args = config["eval_args"] or {}
    split = eval_args.get("split") or {}
    if list(split) != ["LS"] or split["LS"] not in LEAVE_OUT or eval_args.get("order") != "TO":
        raise ConfigError(
            f"cold_item_share needs RecBole's chronological leave-one-out (eval_args: split: {{LS: valid_and_test}}, "
            f"order: TO): the held-out items are kept only where they are a user's last targets; got split {split}, "
            f"order {eval_args.get('order')!r}"
        )
    if config["benchmark_filename"]:
        raise ConfigError("cold_item_share does not apply to pre-split benchmark files (benchmark_filename)")
    return LEAVE_OUT[split["LS"]]


def choose_cold_items(items: np.ndarray, share: float, seed: int) -> np.ndarray:
    """``round(share * len(items))`` of ``items``, sorted, drawn from ``seed`` alone (same seed, same items)."""
    items = np.unique(np.asarray(items))
    count = int(round(share * len(items)))
    if share > 0 and count == 0:
        raise ConfigError(
            f"cold_item_share {share} of {len(items)} items holds out no item: "
            f"raise it to at least {0.5 / len(items):.2g}"
        )
    return np.sort(np.random.default_rng(seed).choice(items, size=count, replace=False))


def evaluation_positions(n: int, leave_out: int) -> int:
    """How many of a user's ``n`` sorted interactions RecBole's leave-one-out makes evaluation targets."""
    return min(leave_out, max(n - 2, 0))


def chronological_order(users: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Row order by user, then time, ties in row order: RecBole's stable sort by time, then by user."""
    return np.lexsort((times, users))


@dataclass
class ColdStartSplit:
    """What :func:`hold_out_interactions` chose and kept."""

    cold_items: np.ndarray  # the held-out item ids, sorted
    keep: np.ndarray  # per row (input order): the interaction stays
    cold_valid_targets: int  # users whose validation target is a cold item
    cold_test_targets: int  # users whose test target is a cold item
    test_targets: int  # users with a test target

    @property
    def dropped(self) -> int:
        return int((~self.keep).sum())


def hold_out_interactions(users, items, times, cold_items, leave_out: int = 2) -> ColdStartSplit:
    """Keep every interaction except those with a ``cold_items`` item at a training position.

    Arrays are per interaction row, in any order. A cold interaction survives only at one of
    the user's evaluation positions (:func:`evaluation_positions`) of the sequence that remains.
    """
    users, items, times = np.asarray(users), np.asarray(items), np.asarray(times)
    is_cold = np.isin(items, np.asarray(cold_items))
    keep = ~is_cold
    order = chronological_order(users, times)
    starts = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1]])
    cold_valid = cold_test = test_targets = 0
    for rows in np.split(order, starts[1:]):
        keep[rows[-leave_out:]] = True  # a cold item among the last ones may stay...
        while True:  # ...while it is still an evaluation target of what remains
            kept = rows[keep[rows]]
            n_eval = evaluation_positions(len(kept), leave_out)
            training = kept[: len(kept) - n_eval]
            cold_training = training[is_cold[training]]
            if not len(cold_training):
                break
            keep[cold_training[0]] = False
        targets = kept[len(kept) - n_eval:]
        if n_eval and leave_out == 2:  # valid_and_test: the last is the test target, the one before it validation
            test_targets += 1
            cold_test += int(is_cold[targets[-1]])
            cold_valid += int(n_eval == 2 and is_cold[targets[0]])
        elif n_eval:  # valid_only / test_only: one target, counted as the test target
            test_targets += 1
            cold_test += int(is_cold[targets[-1]])
    return ColdStartSplit(np.sort(np.unique(cold_items)), keep, cold_valid, cold_test, test_targets)


def hold_out_cold_items(dataset, config) -> ColdStartSplit | None:
    """Apply ``cold_item_share`` to a RecBole dataset before its split (in place); None when it is 0.

    The items are drawn from those with at least one interaction, with the run's ``seed``.
    A share whose items are never a test target is a ``ConfigError``: nothing cold to evaluate.
    """
    share = check_cold_item_share(config["cold_item_share"])
    if share == 0:
        return None
    leave_out = leave_out_count(config)
    frame = dataset.inter_feat  # a pandas DataFrame until RecBole's build()
    uid, iid, time = dataset.uid_field, dataset.iid_field, dataset.time_field
    items = frame[iid].to_numpy()
    cold_items = choose_cold_items(items, share, config["seed"])
    split = hold_out_interactions(frame[uid].to_numpy(), items, frame[time].to_numpy(), cold_items, leave_out)
    if split.cold_test_targets == 0:
        raise ConfigError(
            f"cold_item_share {share}: none of the {len(cold_items)} held-out items of {config['dataset']} is a "
            "user's test target, so there is no cold target to evaluate: raise cold_item_share or change the seed"
        )
    dataset.inter_feat = frame[split.keep].reset_index(drop=True)
    return split


def training_item_counts(dataset) -> np.ndarray:
    """Training interactions per internal item id (``item_num`` entries) of a RecBole dataset.

    For the training split of a sequential dataset: each training target once, plus each
    user's first item (it opens the first history and is never a target); a dataset that is
    not augmented counts its rows. Items with 0 have no training interaction (cold).
    """
    feat = dataset.inter_feat
    items = np.asarray(feat[dataset.iid_field])
    counts = np.bincount(items, minlength=dataset.item_num)
    list_field = getattr(dataset, "item_id_list_field", None)
    length_field = getattr(dataset, "item_list_length_field", None)
    columns = getattr(feat, "columns", None)
    columns = list(columns) if columns is not None else list(feat.interaction)
    if list_field in columns and length_field in columns:
        first_rows = np.asarray(feat[length_field]) == 1
        counts = counts + np.bincount(np.asarray(feat[list_field])[first_rows, 0], minlength=dataset.item_num)
    return counts[: dataset.item_num]
