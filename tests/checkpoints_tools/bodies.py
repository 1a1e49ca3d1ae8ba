"""Multi-rank bodies for the checkpoint-tool tests (run by megafox.testing.distributed)."""
import dataclasses

import torch

from megafox.checkpoint import load_model, save_checkpoint
from megafox.config import ModelConfig
from megafox.model.build import BuildOptions, build_model, transformer_config
from megafox.testing.layout import current_parallel, gather_hf_weights, load_hf_weights
from megafox.training.step import OptimizerSettings, build_optimizer, configure_schedule_hooks, train_step, wrap_ddp


def train_and_save(model, hf_path, root, steps=2, seq=16, micro=1, n_micro=2, seed=11):
    """A few optimizer steps from HF weights at the current layout, then a checkpoint."""
    model = ModelConfig(**model)
    parallel = current_parallel()
    chunks = build_model(model, parallel, BuildOptions())
    load_hf_weights(chunks, torch.load(hf_path), model, parallel)
    ddp = wrap_ddp(chunks, transformer_config(model, parallel), parallel)
    configure_schedule_hooks(ddp)
    optimizer = build_optimizer(ddp, OptimizerSettings(lr=1e-2, weight_decay=0.01, clip_grad=1.0), parallel)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, model.vocab_size, (n_micro * micro, seq + 1), generator=g)
        batch = [{"tokens": tokens[i:i + micro, :-1].contiguous(), "labels": tokens[i:i + micro, 1:].contiguous(),
                  "loss_mask": torch.ones(micro, seq)} for i in range(0, n_micro * micro, micro)]
        iterators = [iter(batch) for _ in ddp] if len(ddp) > 1 else iter(batch)
        train_step(ddp, optimizer, iterators, n_micro, seq, micro)
    meta = {"model": dataclasses.asdict(model), "stage": "stage1", "consumed_tokens": steps * n_micro * micro * seq}
    save_checkpoint(root, steps, ddp, meta)
    return gather_hf_weights(ddp, model, parallel)


def load_and_gather(root):
    """Load a checkpoint at the current layout with the trainer's load_model; HF weights on rank 0."""
    import json
    from pathlib import Path

    from megafox.checkpoint import checkpoint_path

    model = ModelConfig(**json.loads((checkpoint_path(root) / "megafox.json").read_text())["model"])
    parallel = current_parallel()
    chunks = build_model(model, parallel, BuildOptions())
    meta = load_model(root, chunks)
    return {"weights": gather_hf_weights(chunks, model, parallel), "iteration": meta["iteration"]}


def checkpoint_logits(root, ids_path, padded_rows):
    """megafox's own logits for a checkpoint (TP1/PP1 forward after load_model)."""
    import json

    from megafox.checkpoint import checkpoint_path
    from checkpoints_tools.verify import megafox_checkpoint_logits

    model = ModelConfig(**json.loads((checkpoint_path(root) / "megafox.json").read_text())["model"])
    return megafox_checkpoint_logits(root, "latest", model, padded_rows, torch.load(ids_path))
