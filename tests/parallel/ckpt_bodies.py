import torch
from megafox.checkpoint.loader import load_model
from megafox.checkpoint.saver import save_checkpoint
from megafox.checkpoint.state import layout_signature
from megafox.records import CheckpointRecord
from megafox.config import fox1_tiny
from megafox.model.build import build_model
from tests.support.layout import current_parallel, gather_hf_weights, load_hf_weights


def save(hf_path, root):
    model, parallel = fox1_tiny(), current_parallel()
    chunks = build_model(model, parallel)
    load_hf_weights(chunks, torch.load(hf_path), model, parallel)
    record = CheckpointRecord(iteration=5, kind="model-only", model=model, layout=layout_signature(),
                              progress={"stage": "stage1"})
    save_checkpoint(root, 5, chunks, record)
    return True


def load(root):
    model, parallel = fox1_tiny(), current_parallel()
    chunks = build_model(model, parallel)
    meta = load_model(root, chunks)
    return {"weights": gather_hf_weights(chunks, model, parallel), "iteration": meta.iteration}
