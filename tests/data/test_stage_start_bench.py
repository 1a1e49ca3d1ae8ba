"""bench/stage_start.py end to end at its smallest size: every measurement runs, the record excludes
exactly what the previous code excluded, and the growth table and extrapolations are printed."""
import json

import pytest

from tests.support.processes import REPO, run_python

pytestmark = pytest.mark.slow


def test_stage_start_bench_smoke(tmp_path):
    out = tmp_path / "ss.json"
    proc = run_python(REPO / "bench" / "stage_start.py", "--sizes", "1e7,2e7", "--repeat", "1",
                      "--workdir", tmp_path / "w", "--json", out, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for row in result["rows"]:
        for step in ("build1", "start1", "record", "start2", "requeue2", "before"):
            r = row[step]
            assert "error" not in r and r["seconds"] >= 0 and r["cpu_seconds"] >= 0 and r["rss_gb"] > 0.1, step
        # stage 1 consumed to its last whole global batch of 2048 samples of 2048 tokens
        assert row["consumed"] == (row["consumed"] // 2048) * 2048 > 0
        assert row["record"]["excluded"] == row["before"]["excluded"] and sum(row["record"]["excluded"].values()) > 0
    assert result["rows"][1]["documents"] > result["rows"][0]["documents"]
    for text in ("| stage-1 tokens | documents |", "the previous code: the same",
                 "stage-1 index build over 3e+12 tokens", "stage-2 start from the record at Fox-1"):
        assert text in proc.stdout, text
