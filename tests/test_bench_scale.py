"""benchmarks/bench_scale.py's catalogue and timing loop, on a catalogue of a few hundred items."""
import numpy as np

from reveal_recbole.data.features import read_feature_file

from conftest import load_script


def bench():
    return load_script("benchmarks/bench_scale")


def test_the_random_catalogue_covers_every_item_along_feature_neighbourhoods(tmp_path):
    module = bench()
    name = module.make_catalogue(tmp_path, 1000, (12, 6), seed=3)
    folder = tmp_path / name
    lines = (folder / f"{name}.inter").read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    rows = [line.split("\t") for line in lines[1:]]
    assert {item for _, item, _ in rows} == {f"i{i}" for i in range(1000)}  # the catalogue is every item
    assert len(rows) == 2 * 1000  # two interactions per item on average
    image_tokens, image = read_feature_file(folder / f"{name}.image.npy", folder / f"{name}.image.items")
    assert image.shape == (1000, 12) and image_tokens[7] == "i7"
    # a user's items sit in one feature neighbourhood: consecutive items are nearer than random pairs
    by_user = {}
    for user, item, _ in rows:
        by_user.setdefault(user, []).append(int(item[1:]))
    unit = np.asarray(image) / np.linalg.norm(image, axis=1, keepdims=True)
    consecutive = np.mean([unit[a] @ unit[b] for items in by_user.values() for a, b in zip(items, items[1:])])
    shuffled = np.random.default_rng(0).permutation(1000)
    assert consecutive > np.mean(np.sum(unit * unit[shuffled], axis=1)) + 0.3
    assert module.make_catalogue(tmp_path, 1000, (12, 6), seed=3) == name  # made once, then reused


def test_timings_and_table_for_sasrec_and_its_reveal_version(tmp_path, monkeypatch):
    module = bench()
    monkeypatch.chdir(tmp_path)  # RecBole's log folders
    name = module.make_catalogue(tmp_path, 300, (8, 4))
    args = type("Args", (), {"device": "cpu", "steps": 2, "eval_batches": 2, "repeats": 1})
    result = module.measure_timings(tmp_path, name, ["SASRec", "SASRecREVEAL", "FeatureKNN"], args)
    assert result["items"] == 300
    assert len(result["train"]["SASRecREVEAL"]) == 1 and "FeatureKNN" not in result["train"]  # nothing to train
    assert all(seconds > 0 for seconds in result["eval"]["FeatureKNN"])
    table = module.table([result], ["SASRec", "SASRecREVEAL", "FeatureKNN"])
    assert table.count("\n") == 4 and "| 300 | SASRec | " in table and "1.000x" in table
