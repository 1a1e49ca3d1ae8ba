"""bench/stage_start.py end to end at its smallest size: every measurement runs, the record excludes
exactly what the previous code excluded, and the growth table and extrapolations are printed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_stage_start_bench_smoke(tmp_path):
    out = tmp_path / "ss.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "stage_start.py"), "--sizes", "1e7,2e7",
                           "--repeat", "1", "--workdir", str(tmp_path / "w"), "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
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
