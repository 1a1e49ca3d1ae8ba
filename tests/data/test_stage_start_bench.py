"""bench/stage_start.py end to end at its smallest size: every measurement runs, the quantities it
reports agree with what it measured (document counts read back from the .idx files it wrote, the
consumed samples in closed form, process memory and CPU time consistent with each other), the record
excludes exactly what the previous code excluded, and the growth table and extrapolations are printed.

Not asserted: the memory-mapped lengths' private-memory saving. At these sizes (~25k documents) the
int64 copy it removed is 0.2 MB, below the run-to-run noise of a process's anonymous memory; the
saving is measured at 1e8..1e11 tokens in bench/RESULTS_stage_start.md."""
import json
import math
import warnings

import pytest

from tests.support.processes import REPO, run_python

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
SIZES = (1e7, 2e7)
SEQ1 = GBS1 = 2048  # stage 1 of the bench: Fox-1's sequence length and global batch


def _documents(prefix) -> int:
    """The document count of a Megatron .idx, read by megatron-core (not by the bench)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return len(IndexedDataset(str(prefix)).document_indices) - 1


def test_stage_start_bench_smoke(tmp_path):
    out = tmp_path / "ss.json"
    proc = run_python(REPO / "bench" / "stage_start.py", "--sizes", ",".join(map(str, SIZES)), "--repeat", "1",
                      "--workdir", tmp_path / "w", "--json", out, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    baseline = result["rows"][0]["baseline"]
    for size, row in zip(SIZES, result["rows"]):
        docs = {name: _documents(tmp_path / "w" / f"n{size:.0e}" / name) for name in ("web", "code")}
        assert row["documents"] == sum(docs.values()), (row["documents"], docs)
        # stage 1 consumed to its last whole global batch of 2048 samples of 2048 tokens
        assert row["consumed"] == math.ceil(size / SEQ1) // GBS1 * GBS1 > 0
        for step in ("build1", "start1", "record", "start2", "requeue2", "before"):
            r = row[step]
            assert "error" not in r, (step, r)
            # one OpenMP thread: the process cannot use more CPU than wall time (timer granularity aside)
            assert r["seconds"] > 0 and 0 < r["cpu_seconds"] <= r["seconds"] * 1.05 + 0.01, (step, r)
            # anonymous memory held at the end is part of the peak RSS, which includes the imports
            assert 0 < r["anon_gb"] <= r["rss_gb"] and r["rss_gb"] >= 0.95 * baseline["rss_gb"], (step, r)
        excluded = row["record"]["excluded"]
        assert excluded == row["before"]["excluded"] and set(excluded) == set(docs)
        assert all(0 < excluded[name] < docs[name] for name in docs), (excluded, docs)  # stage 1 read part of each
    assert result["rows"][1]["documents"] > result["rows"][0]["documents"]
    for text in ("| stage-1 tokens | documents |", "the previous code: the same",
                 "stage-1 index build over 3e+12 tokens", "stage-2 start from the record at Fox-1"):
        assert text in proc.stdout, text
