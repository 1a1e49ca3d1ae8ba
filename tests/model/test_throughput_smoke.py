"""bench/throughput.py end to end on CPU with a tiny model: every system measured, one table
with the megafox ratios, JSON written; and the loss-only microbenchmark's table and JSON."""
import json

import pytest

from tests.support.processes import REPO, run_python

SYSTEMS = ["megafox", "megafox_unfused", "hf", "mcore"]


def _run(*args):
    proc = run_python(REPO / "bench" / "throughput.py", *args, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_tiny_throughput_table_and_json(tmp_path):
    out = _run("--tiny", "--systems", ",".join(SYSTEMS), "--seqs", "32", "--json", str(tmp_path / "r.json"))
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["kind"] == "throughput" and data["model"] == "bench-tiny"
    results = {r["system"]: r for r in data["results"]}
    assert set(results) == set(SYSTEMS)
    for name, r in results.items():
        assert "error" not in r, (name, r)
        assert r["seq"] == 32 and r["tokens_per_s"] > 0
        assert r["model_tflops"] == pytest.approx(r["mfu"] * data["peak_tflops"])
    table = out[out.index("   seq mbs system"):].splitlines()
    assert "x hf" in table[0] and "x mcore" in table[0] and "x megafox_unfused" in table[0]
    megafox_row = next(line for line in table if line.split()[2:3] == ["megafox"])
    ratio_hf = results["megafox"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    assert f"{ratio_hf:.2f}x" in megafox_row.split()


def test_unknown_system_is_refused():
    proc = run_python(REPO / "bench" / "throughput.py", "--tiny", "--systems", "jax", timeout=60)
    assert proc.returncode == 2 and "--systems: unknown jax" in proc.stderr


@pytest.mark.slow  # three worker processes (peak RSS is per process)
def test_loss_only_microbenchmark(tmp_path):
    out = _run("--loss-only", "--tokens", "256", "--vocab", "4096", "--hidden", "64", "--loss-chunk-tokens", "64",
               "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "l.json"))
    data = json.loads((tmp_path / "l.json").read_text())
    rows = {r["variant"]: r for r in data["results"]}
    assert set(rows) == {"unfused", "recompute", "precompute"}
    for name, r in rows.items():
        assert "error" not in r, (name, r)
        assert r["time_ms"] > 0 and r["extra_peak_gib"] >= 0
    assert rows["recompute"]["chunk"] == 64 and rows["unfused"]["chunk"] is None
    assert out.splitlines()[0].split()[:2] == ["variant", "tokens"]
