"""benchmarks/tuning_table.py: the best trial of a run_hyper search is chosen on validation only."""
import pytest

from conftest import load_script

RESULT = """learning_rate:0.003, weight_decay:0.0001
Valid result:
recall@10 : 0.06    recall@20 : 0.098    ndcg@10 : 0.028    ndcg@20 : 0.0375
Test result:
recall@10 : 0.036    recall@20 : 0.084    ndcg@10 : 0.0176    ndcg@20 : 0.0295

learning_rate:0.001, weight_decay:0.0
Valid result:
recall@10 : 0.048    recall@20 : 0.089    ndcg@10 : 0.0245    ndcg@20 : 0.0345
Test result:
recall@10 : 0.039    recall@20 : 0.078    ndcg@10 : 0.0298    ndcg@20 : 0.0395

learning_rate:0.003, weight_decay:0.0
Valid result:
recall@10 : 0.06    recall@20 : 0.11    ndcg@10 : 0.028    ndcg@20 : 0.0404
Test result:
recall@10 : 0.048    recall@20 : 0.09    ndcg@10 : 0.0236    ndcg@20 : 0.0339
"""


def test_the_best_trial_is_the_best_on_valid_ndcg10_then_ndcg20_never_on_test():
    table = load_script("benchmarks/tuning_table")
    trials = table.read_trials(RESULT)
    assert [t["params"] for t in trials] == [{"learning_rate": 0.003, "weight_decay": 0.0001},
                                             {"learning_rate": 0.001, "weight_decay": 0.0},
                                             {"learning_rate": 0.003, "weight_decay": 0.0}]
    assert trials[1]["test"]["ndcg@10"] == 0.0298  # the best test score: not chosen
    best = table.best_trial(trials)
    assert best is trials[2]  # tied on valid NDCG@10 with the first trial, ahead on valid NDCG@20
    assert table.spec("M3SRec", best["params"]) == "M3SRec[learning_rate=0.003,weight_decay=0]"


def test_a_file_that_is_not_a_hyper_result_is_refused():
    with pytest.raises(ValueError, match="not a RecBole hyper result block"):
        load_script("benchmarks/tuning_table").read_trials("learning_rate:0.1\nsomething else\n")


def test_the_table_prints_each_models_best_and_its_default_settings_test(tmp_path, capsys):
    path = tmp_path / "hyper-shared-scientific-SASRec.result"
    path.write_text(RESULT)
    load_script("benchmarks/tuning_table").main([str(path)])
    out = capsys.readouterr().out
    # SASRec's own default (lr .001, wd 0) was trial 2: its test score is the default column
    assert "| SASRec | learning_rate 0.003, weight_decay 0 | 0.0280 | 0.0236 | 0.0298 | 3 |" in out
    assert '--model="SASRec[learning_rate=0.003,weight_decay=0]" --dataset=scientific' in out
