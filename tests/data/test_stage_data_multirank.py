"""StageData under torch.distributed: 2 DP ranks sharing one cache dir read exactly what one
process reads."""
from pathlib import Path

import pytest
import torch

from megafox.data.stage_data import StageData
from tests.support.distributed import run_distributed
from tests.data.data_helpers import gather
from tests.support.indexed import write_blend
from tests.support.processes import torchrun

pytestmark = [pytest.mark.multirank, pytest.mark.slow]


def test_two_ranks_share_cache_and_split_global_batches(corpus_data, tok_model, tmp_path):
    code, prose = corpus_data["code"], corpus_data["prose"]
    s1 = write_blend(tmp_path / "s1" / "blend.json", tok_model, [(code, 1.0)], 48 * 64, "stage1")
    s2 = write_blend(tmp_path / "s2" / "blend.json", tok_model, [(code, 0.5), (prose, 0.5)], 32 * 128, "stage2")
    cache = tmp_path / "shared_cache"
    out = run_distributed("tests/data/bodies.py:stage_batches", 2, {}, dict(
        blend=s2, prev_blend=s1, prev_consumed=40, prev_seq=64, seq=128, gbs=8, mbs=2,
        cache_dir=str(cache), batches=3))
    assert out["dp"] == 2
    ref = StageData(s2, 128, 8, cache_dir=str(tmp_path / "own_cache"), previous_stages=[(s1, 40, 64)])
    assert out["excluded"] == {k: v.tolist() for k, v in ref.excluded_documents.items()}
    expect = gather(ref, 0, 24)
    ids = [set(r[0].tolist()) for r in out["per_rank"]]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(24))
    for rank_ids, rank_tokens in out["per_rank"]:
        assert torch.equal(rank_tokens, expect["tokens"][rank_ids])
    assert any(p.name.endswith("shuffle_index.npy") for p in cache.iterdir())


def _torchrun(script_args, timeout=180):
    return torchrun(2, Path(__file__).with_name("slow_build_ranks.py"), *script_args, timeout=timeout)


def test_rank0_build_longer_than_the_process_group_timeout(corpus_data, tok_model, tmp_path):
    """Rank 0 builds for 7 s under a 3 s process-group timeout: the other rank waits on rank 0's flag
    file, not in a collective, and then reads exactly what one process builds."""
    import json

    blend = write_blend(tmp_path / "b" / "blend.json", tok_model,
                        [(corpus_data["code"], 0.5), (corpus_data["prose"], 0.5)], 64 * 64, "mix")
    common = ["--blend", blend, "--timeout-s", "3", "--sleep-s", "7"]
    # the setup can fail: a plain barrier while rank 0 is busy that long times out
    control = _torchrun(["--mode", "control", "--cache", str(tmp_path / "unused"), "--out", str(tmp_path / "c")] + common)
    assert control.returncode != 0 and "timed out" in (control.stdout + control.stderr).lower()

    out = str(tmp_path / "slow")
    run = _torchrun(["--mode", "slow", "--cache", str(tmp_path / "cache"), "--out", out] + common)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [json.loads(open(f"{out}.rank{r}.json").read()) for r in range(2)]
    assert ranks[0]["seconds"] > 7 and ranks[1]["seconds"] > 7  # rank 1 did wait for the whole build
    expect = gather(StageData(blend, 64, 8, cache_dir=str(tmp_path / "own")), 0, 32)["tokens"]
    for r in ranks:
        assert torch.equal(torch.tensor(r["tokens"]), expect)

    # rank 0's build fails: every rank stops with rank 0's message
    out = str(tmp_path / "fail")
    run = _torchrun(["--mode", "fail", "--seq", "100000", "--cache", str(tmp_path / "cache2"), "--out", out] + common)
    assert run.returncode == 0, run.stderr[-4000:]
    errors = [json.loads(open(f"{out}.rank{r}.json").read())["error"] for r in range(2)]
    assert errors[0] == errors[1] and "seq_length 100000 is larger than the data allows" in errors[0]
