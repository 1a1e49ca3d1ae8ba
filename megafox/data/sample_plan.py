"""Which samples of a global batch each data-parallel rank trains on (megatron's pretraining
sampler layout), shared by every dataset megafox trains on.

The global batch starting at sample c is samples [c, c + global_batch_size); micro-batch m of DP
rank r holds c + m*mbs*dp + r*mbs + [0, mbs). The union over ranks is the global batch, and a
dataset's own sample order never depends on the layout, so a saved consumed-sample count resumes
the same run at any DP size or micro-batch size.
"""
from __future__ import annotations

from typing import List

import numpy as np

from megafox.data.blend import DataError


def rank_micro_batches(start: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int) -> List[np.ndarray]:
    """The sample ids of each of this rank's micro-batches of the global batch starting at `start`."""
    for name, v, low in (("consumed_samples", start, 0), ("micro_batch_size", micro_batch_size, 1),
                         ("dp_size", dp_size, 1), ("dp_rank", dp_rank, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise DataError(f"{name}: must be an integer >= {low}, got {v!r}")
    if dp_rank >= dp_size:
        raise DataError(f"dp_rank: {dp_rank} is not below dp_size {dp_size}")
    per_step = micro_batch_size * dp_size
    if global_batch_size % per_step:
        raise DataError(f"global_batch_size {global_batch_size} is not divisible by micro_batch_size x "
                        f"dp_size = {micro_batch_size} x {dp_size}")
    first = int(start) + int(dp_rank) * micro_batch_size
    return [np.arange(first + m * per_step, first + m * per_step + micro_batch_size, dtype=np.int64)
            for m in range(global_batch_size // per_step)]
