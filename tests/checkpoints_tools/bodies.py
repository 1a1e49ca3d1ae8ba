"""Multi-rank bodies for the checkpoint-tool tests (run by tests.support.distributed)."""
import torch

from megafox.checkpoint.loader import load_model
from megafox.checkpoint.saver import save_training_checkpoint
from megafox.checkpoint.state import layout_signature
from megafox.config import BuildConfig, ModelConfig, OptimizerConfig
from megafox.records import CheckpointRecord, RunState
from tests.support.layout import current_parallel, gather_hf_weights, load_hf_weights
from megafox.training.stack import build_training_stack
from megafox.training.step import train_step


def train_and_save(model, hf_path, root, steps=2, seq=16, micro=1, n_micro=2, seed=11):
    """A few optimizer steps from HF weights at the current layout, then a training checkpoint
    (model, optimizer and RNG state, as the trainer saves it)."""
    model = ModelConfig(**model)
    parallel = current_parallel()
    hf = torch.load(hf_path, weights_only=True)
    stack = build_training_stack(model, parallel, BuildConfig(precision="fp32"),
                                 OptimizerConfig(lr=1e-2, weight_decay=0.01, clip_grad=1.0),
                                 load_weights=lambda chunks: load_hf_weights(chunks, hf, model, parallel))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, model.vocab_size, (n_micro * micro, seq + 1), generator=g)
        batch = [{"tokens": tokens[i:i + micro, :-1].contiguous(), "labels": tokens[i:i + micro, 1:].contiguous(),
                  "loss_mask": torch.ones(micro, seq)} for i in range(0, n_micro * micro, micro)]
        iterators = [iter(batch) for _ in stack.model] if len(stack.model) > 1 else iter(batch)
        train_step(stack.model, stack.optimizer, iterators, n_micro, seq, micro)
    samples = steps * n_micro * micro
    record = CheckpointRecord(iteration=steps, kind="train", model=model, layout=layout_signature(), stage="stage1",
                              scheduler={}, run_state=RunState(iteration=steps, consumed_tokens=samples * seq,
                                                               consumed_samples={"stage1": samples}))
    save_training_checkpoint(root, steps, stack.model, stack.optimizer, record)
    return gather_hf_weights(stack.model, model, parallel)


def load_and_gather(root):
    """Load a checkpoint at the current layout with the trainer's load_model; HF weights on rank 0."""
    from megafox.checkpoint.layout import read_record
    from megafox.model.build import build_model

    model = read_record(root).model
    parallel = current_parallel()
    chunks = build_model(model, parallel)
    record = load_model(root, chunks)
    return {"weights": gather_hf_weights(chunks, model, parallel), "iteration": record.iteration}


def checkpoint_logits(root, ids_path, padded_rows):
    """megafox's own logits for a checkpoint (TP1/PP1 forward after load_model)."""
    from checkpoints_tools.hf_compare import megafox_checkpoint_logits
    from megafox.checkpoint.layout import read_record

    model = read_record(root).model
    return megafox_checkpoint_logits(root, "latest", model, padded_rows, torch.load(ids_path, weights_only=True))
