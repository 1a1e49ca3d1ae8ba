"""A curriculum stage's `Batches`, chosen by the stage's kind: the one place that knows which
implementation reads which kind of stage (the trainer only holds a `Batches`).

    pretrain  `StageData` over the stage's blend, without the documents earlier stages read
    sft       `SFTData`: packed chat conversations; the stage's length is the data's
"""
from __future__ import annotations

from typing import Callable, Dict, List

from megafox.config import ConfigError, StageConfig, TrainConfig
from megafox.data.batches import Batches
from megafox.data.build_index import cache_dir, stage_data_from_config
from megafox.data.documents_read import record_before, record_dir, save_document_set
from megafox.data.sft_data import SFTData
from megafox.model.specs import require_packed_support
from megafox.runtime.dist import is_rank0

# the earlier stages exactly as they were trained (megafox.training.curriculum.previous_stage_specs)
PreviousStages = Callable[[], List[dict]]


def open_stage_batches(config: TrainConfig, stage: StageConfig, stage_index: int, log,
                       previous_stages: PreviousStages) -> Batches:
    """Every rank calls it (the index caches are built collectively). `previous_stages` is called
    only when a stage needs the earlier stages' specs."""
    blend = config.blend_path(stage)
    if not blend.is_file():
        raise ConfigError(f"stages.{stage.name}.data: {blend} not found (run `make preprocess` or set data_dir)")
    return _OPENERS[stage.kind](config, stage, stage_index, log, previous_stages)


def _pretraining(config: TrainConfig, stage: StageConfig, stage_index: int, log,
                 previous_stages: PreviousStages) -> Batches:
    """As `make data-index` builds it ahead (one definition). The documents earlier stages read come
    from the previous stage's record; a run that finished that stage before records existed
    recomputes them once and records them for its requeues."""
    excluded = record_before(config, stage_index)
    if excluded is not None:
        log(f"stage {stage.name}: leaving out the documents of {', '.join(e['stage'] for e in excluded.stages)}"
            f" ({sum(e.count for e in excluded.entries.values())} documents, recorded in {excluded.path})")
        return stage_data_from_config(config, stage.name, excluded_documents=excluded)
    data = stage_data_from_config(config, stage.name, previous_stages=previous_stages())
    if stage_index > 0 and is_rank0():
        save_document_set(data.excluded_documents, record_dir(config.checkpoint.dir, config.stages[stage_index - 1].name))
    return data


def _sft(config: TrainConfig, stage: StageConfig, stage_index: int, log,
         previous_stages: PreviousStages) -> Batches:
    """Packed chat conversations; the stage's length is the data's (its epochs of packed rows),
    capped by token_budget when the config sets one. (No earlier stage's data matters to it.)"""
    require_packed_support(config.model.transformer_impl)
    data = SFTData(str(config.blend_path(stage)), stage.seq_length, stage.global_batch_size, seed=config.seed,
                   epochs=stage.epochs, valid_fraction=config.validation.valid_fraction, cache_dir=cache_dir(config))
    available = data.num_samples * stage.seq_length
    stage.token_budget = min(stage.token_budget or available, available)
    config.validate_schedule()
    log(f"stage {stage.name}: {data.num_real_samples} packed rows of {stage.seq_length} tokens over {stage.epochs} "
        f"epoch(s), packing efficiency {100 * data.packing_efficiency:.1f}%: {stage.num_steps} steps")
    return data


_OPENERS: Dict[str, Callable[..., Batches]] = {"pretrain": _pretraining, "sft": _sft}
