"""benchmarks/bench_eval_memory.py: one model's probe on a small catalogue and the table it writes."""
from conftest import load_script


def test_probe_reports_the_declared_buffers_and_splits_the_growth(tmp_path, monkeypatch):
    module = load_script("benchmarks/bench_eval_memory")
    monkeypatch.chdir(tmp_path)  # RecBole's log folders
    row = module.probe("MISSRec", tmp_path, 2000, (8, 4), users=16, repeats=1)
    from reveal_recbole.model.missrec import MISSRec

    assert row["model"] == "MISSRec" and row["items"] == 2000 and row["users"] == 16
    assert row["declared"] == MISSRec.eval_score_buffers
    assert row["per_user_matrices"] >= 0 and row["fixed_mb"] >= 0 and len(row["seconds"]) == 1
    table = module.table([row, {"model": "M3SRec", "items": 2000, "error": "ValueError: x"}]).splitlines()
    assert len(table) == 4 and table[2].startswith(f"| 2,000 | MISSRec | {MISSRec.eval_score_buffers} | ")
    assert table[3].startswith("| 2,000 | M3SRec | - | error: ValueError: x |")
    assert table[2].endswith("| - |")  # no SASRec row in this run: no ratio
