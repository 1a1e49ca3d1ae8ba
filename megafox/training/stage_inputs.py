"""A stage's training data for the trainer (`megafox.data.kinds` picks the `Batches` for the
stage's kind), and the tokenizer's special ids written into the model config (they come from the
tokenizer, never from presets)."""
from __future__ import annotations

from megafox.config import StageConfig, TrainConfig
from megafox.data.batches import Batches
from megafox.data.kinds import open_stage_batches
from megafox.training import curriculum


def build_stage_data(config: TrainConfig, stage: StageConfig, stage_index: int, log) -> Batches:
    """Every rank calls it (the index caches are built collectively)."""
    data = open_stage_batches(config, stage, stage_index, log,
                              previous_stages=lambda: curriculum.previous_stage_specs(config, stage_index))
    data.check_vocab(config.model.vocab_size)
    config.model.eos_token_id = data.tokenizer.eos
    if data.tokenizer.bos is not None:
        config.model.bos_token_id = data.tokenizer.bos
    return data
