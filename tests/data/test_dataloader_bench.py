"""bench/dataloader.py end to end on a small synthetic corpus: the trainer's loader timed per
sequence length against the GPU's need, one table, JSON written."""
import json

from tests.support.processes import REPO, run_python


def test_loader_bench_table_and_json(tmp_path):
    proc = run_python(REPO / "bench" / "dataloader.py", "--tokens", "300000", "--seqs", "2048,8192", "--steps", "2",
                      "--batch-tokens", "65536", "--json", tmp_path / "dl.json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "dl.json").read_text())["results"]
    assert [r["seq"] for r in rows] == [2048, 8192]
    for r in rows:
        # rank 0 of DP 8 at micro-batch 1: 65536 tokens per step / 8 ranks, two steps
        assert r["samples_per_rank"] == 2 * 65536 // r["seq"] // 8
        assert r["loader_tokens_per_s"] > 0 and r["headroom"] == r["loader_tokens_per_s"] / r["gpu_tokens_per_s_at_goal"]
    assert 40_000 < rows[0]["gpu_tokens_per_s_at_goal"] < 45_000  # the 43K tokens/s at 2K, 50% MFU
    assert "headroom" in proc.stdout and "loader % of step" in proc.stdout
