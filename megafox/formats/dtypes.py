"""The name a file records for a dtype ("uint16", "int32", "bfloat16"...): one rule for numpy dtypes
(indexed datasets, data_prep manifests) and torch dtypes (a Hugging Face config's torch_dtype)."""
from __future__ import annotations

import numpy as np


def dtype_name(dtype) -> str:
    if type(dtype).__module__ == "torch":  # a torch.dtype, named without importing torch here
        return str(dtype).rpartition(".")[2]
    return np.dtype(dtype).name
