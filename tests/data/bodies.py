"""Bodies run on several ranks by tests.support.distributed.run_distributed."""
import torch


def stage_batches(blend, prev_blend, prev_consumed, prev_seq, seq, gbs, mbs, cache_dir, batches):
    from megatron.core import parallel_state as ps

    from megafox.data.stage_data import StageData

    # every rank builds at once over one fresh cache dir: rank 0 writes, the others read
    sd = StageData(blend, seq, gbs, cache_dir=cache_dir, previous_stages=[(prev_blend, prev_consumed, prev_seq)])
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = [mb for b in range(batches) for mb in sd.micro_batches(b * gbs, mbs, dp_rank, dp)]
    local = (torch.cat([mb["sample_index"] for mb in mine]), torch.cat([mb["tokens"] for mb in mine]))
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, local)
    return {"dp": dp, "per_rank": everyone,
            "excluded": {k: v.tolist() for k, v in sd.excluded_documents.items()}}
