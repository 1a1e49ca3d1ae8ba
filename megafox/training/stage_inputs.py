"""A stage's training data for the trainer: the pretraining blend (StageData, the documents
earlier stages read left out) or packed chat conversations (SFTData); the tokenizer's special ids
written into the model config (they come from the tokenizer, never from presets)."""
from __future__ import annotations

from pathlib import Path

from megafox.config import ConfigError, StageConfig, TrainConfig
from megafox.runtime.dist import is_rank0
from megafox.training import curriculum


def build_stage_data(config: TrainConfig, stage: StageConfig, stage_index: int, log):
    """Every rank calls it (the index caches are built collectively)."""
    blend = config.blend_path(stage)
    if not blend.is_file():
        raise ConfigError(f"stages.{stage.name}.data: {blend} not found (run `make preprocess` or set data_dir)")
    if stage.kind == "sft":
        data = _sft_data(config, stage, blend, log)
    else:
        data = _pretraining_data(config, stage, stage_index, log)
    data.check_vocab(config.model.vocab_size)
    config.model.eos_token_id = data.tokenizer.eos
    if data.tokenizer.bos is not None:
        config.model.bos_token_id = data.tokenizer.bos
    return data


def _pretraining_data(config: TrainConfig, stage: StageConfig, stage_index: int, log):
    """As `make data-index` builds it ahead (one definition). The documents earlier stages read come
    from the previous stage's record; a run that finished that stage before records existed
    recomputes them once and records them for its requeues."""
    from megafox.data.build_index import stage_data_from_config
    from megafox.data.documents_read import record_before, record_dir, save_document_set

    excluded = record_before(config, stage_index)
    if excluded is not None:
        log(f"stage {stage.name}: leaving out the documents of {', '.join(e['stage'] for e in excluded.stages)}"
            f" ({sum(e.count for e in excluded.entries.values())} documents, recorded in {excluded.path})")
        return stage_data_from_config(config, stage.name, excluded_documents=excluded)
    data = stage_data_from_config(config, stage.name,
                                  previous_stages=curriculum.previous_stage_specs(config, stage_index))
    if stage_index > 0 and is_rank0():
        save_document_set(data.excluded_documents, record_dir(config.checkpoint.dir, config.stages[stage_index - 1].name))
    return data


def _sft_data(config: TrainConfig, stage: StageConfig, blend: Path, log):
    """Packed chat conversations; the stage's length is the data's (its epochs of packed rows),
    capped by token_budget when the config sets one."""
    from megafox.data.build_index import cache_dir
    from megafox.data.sft_data import SFTData
    from megafox.model.specs import require_packed_support

    require_packed_support(config.model.transformer_impl)
    data = SFTData(str(blend), stage.seq_length, stage.global_batch_size, seed=config.seed, epochs=stage.epochs,
                   valid_fraction=config.validation.valid_fraction, cache_dir=cache_dir(config))
    available = data.num_samples * stage.seq_length
    stage.token_budget = min(stage.token_budget or available, available)
    config.validate_schedule()
    log(f"stage {stage.name}: {data.num_real_samples} packed rows of {stage.seq_length} tokens over {stage.epochs} "
        f"epoch(s), packing efficiency {100 * data.packing_efficiency:.1f}%: {stage.num_steps} steps")
    return data


def tokenizer_record(tokenizer, data) -> dict:
    """What checkpoints record of the tokenizer (megafox-to-hf ships it), with the chat template
    of SFT data, so the exported tokenizer formats chats as the model was trained."""
    record = tokenizer.info()
    template = getattr(data, "chat_template", None)
    if template:
        record["chat_template"] = template
    return record
