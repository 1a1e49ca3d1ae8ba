"""A megafox checkpoint run by megafox itself, for comparing with transformers on its export:
one-rank bodies for tests.support.distributed.run_distributed (the model is built at TP1/PP1 and
loaded the way the trainer loads it, checkpoints_tools.hf_compare)."""
from typing import List

import torch

from megafox.checkpoint.reader import DistCheckpoint
from checkpoints_tools.hf_compare import load_checkpoint_model, megafox_logits
from megafox.model.hf_adapter import MCORE_EMBEDDING


def _load(root: str, iteration="latest"):
    ckpt = DistCheckpoint(root, iteration)
    # the embedding's rows as saved: the vocabulary padded for the TP it was trained at
    return load_checkpoint_model(root, iteration, ckpt.model, ckpt.shape(MCORE_EMBEDDING)[0]), ckpt.model


def logits(roots: List[str], ids: List[List[int]], iteration="latest") -> List[torch.Tensor]:
    """megafox's logits over the real vocabulary for a batch of token id rows, per checkpoint root."""
    out = []
    for root in roots:
        module, model = _load(root, iteration)
        out.append(megafox_logits(module, model, torch.tensor(ids)))
        del module
    return out


@torch.no_grad()
def greedy_tokens(root: str, prompt: List[int], max_new_tokens: int, eos_id: int, iteration="latest") -> List[int]:
    """The checkpoint's greedy continuation of `prompt`: the argmax at the last position appended
    each step (the whole sequence re-run, no cache), stopping after `eos_id`."""
    module, model = _load(root, iteration)
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(megafox_logits(module, model, torch.tensor([ids]))[0, -1].argmax()))
        if ids[-1] == eos_id:
            break
    return ids[len(prompt):]
