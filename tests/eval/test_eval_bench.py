"""bench/eval_speed.py keeps working: a reduced run of all three request types on the smallest
preset prints the megafox vs lm_eval hf table, and both sides agree on what they computed."""
import re

import pytest

from tests.support.processes import REPO, run_python

pytestmark = pytest.mark.slow


def test_bench_reduced(tmp_path):
    proc = run_python(REPO / "bench" / "eval_speed.py", "--preset", "fox1-tiny", "--requests", 3, "--context", 64,
                      "--generate", 3, "--gen-toks", 6, "--documents", 2, "--repeat", 1, "--workdir", tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in ("multiple choice (loglikelihood)", "GSM8K-like (generate_until)",
                 "perplexity (loglikelihood_rolling)", "all"):
        assert re.search(rf"\| {re.escape(name)} \|[^\n]*\| \d+\.\d\dx \|", proc.stdout), name
    assert "identical generations: 3/3" in proc.stdout
    diff = float(re.search(r"max \|loglikelihood difference\| = (\S+);", proc.stdout).group(1))
    assert diff < 1e-4
