"""StageData under torch.distributed: 2 DP ranks sharing one cache dir read exactly what one
process reads."""
import pytest
import torch

from data_helpers import gather, write_blend
from megafox.data.stage_data import StageData
from megafox.testing.distributed import run_distributed

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
