"""Small random HF Llama models, the reference megafox is checked against."""
from __future__ import annotations

from typing import Dict

import torch

from megafox.config import ModelConfig
from megafox.model.hf_mapping import hf_config_dict


def hf_llama(model: ModelConfig, seed: int = 0, dtype: str = "float32"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in hf_config_dict(model, dtype).items()
           if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    # HF initializes norms to 1; random norms make the test see a swapped norm mapping.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return hf


def hf_state(model: ModelConfig, seed: int = 0) -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in hf_llama(model, seed).state_dict().items()}
