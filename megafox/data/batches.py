"""What the trainer asks of a stage's data: `Batches`, the one protocol that pretraining
(`stage_data.StageData`) and instruction tuning (`sft_data.SFTData`) implement, and the sampler
layout they share (`rank_micro_batches`).  `kinds.open_stage_batches` picks the implementation
from the stage's kind, so the trainer never asks which one it holds.

A stage's samples form ONE global order: sample id k (0 <= k < num_samples) is the stage's k-th
sample, and the held-out split has its own order of num_valid_samples.  The trainer keeps only
the stage's consumed-sample count (saved with every checkpoint); the data holds no iterator state.

The layout (megatron's pretraining sampler).  The global batch starting at sample c is samples
[c, c + global_batch_size); micro-batch m of DP rank r holds c + m*mbs*dp + r*mbs + [0, mbs).
The union over ranks is the global batch, and a dataset's own sample order never depends on the
layout, so a saved consumed-sample count resumes the same run at any DP size or micro-batch size.

An implementation sets blend_path, stage, seq_length, global_batch_size, num_samples,
num_valid_samples and tokenizer (and chat_template when its blend has one), and gives
`_collate` (sample ids -> a micro-batch dict) and `_samples_source` (for the past-the-end error).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from megafox.data.blend import DataError
from megafox.formats.tokenizer import SentencePieceTokenizer


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


class Batches(ABC):
    """A stage's training and held-out samples, as DP-sharded micro-batches (the dicts
    `megafox.training.step.forward_step` reads: tokens, labels, loss_mask, sample_index, and for
    packed rows position_ids, cu_seqlens, max_seqlen)."""

    blend_path: str
    stage: str
    seq_length: int
    global_batch_size: int
    num_samples: int
    num_valid_samples: int
    tokenizer: SentencePieceTokenizer
    chat_template: Optional[str] = None  # the blend's, for SFT data: exported with the tokenizer

    # ------------------------------------------------------------------------------ batches
    def micro_batches(self, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                      dp_size: int) -> Iterator[Dict[str, torch.Tensor]]:
        """This DP rank's micro-batches of the global batch starting at stage sample `consumed_samples`."""
        ids = rank_micro_batches(consumed_samples, self.global_batch_size, micro_batch_size, dp_rank, dp_size)
        if consumed_samples + self.global_batch_size > self.num_samples:
            raise DataError(
                f"stage {self.stage}: samples [{consumed_samples}, {consumed_samples + self.global_batch_size}) are "
                f"past its end: {self._samples_source()}")
        return (self._collate(chunk, valid=False) for chunk in ids)

    def valid_micro_batches(self, start_sample: int, micro_batch_size: int, dp_rank: int,
                            dp_size: int) -> Iterator[Dict[str, torch.Tensor]]:
        """`micro_batches` over the held-out split; nothing when [start, start + global batch)
        passes its end (or there is none: num_valid_samples is 0)."""
        ids = rank_micro_batches(start_sample, self.global_batch_size, micro_batch_size, dp_rank, dp_size)
        if start_sample + self.global_batch_size > self.num_valid_samples:
            return iter(())
        return (self._collate(chunk, valid=True) for chunk in ids)

    def pipeline_shape(self, micro_batch_size: int) -> Tuple[int, int]:
        """(seq_length, micro_batch_size) as train_step takes them: the shape of the activations
        pipeline stages exchange for one micro-batch."""
        return self.seq_length, micro_batch_size

    @abstractmethod
    def _collate(self, ids: np.ndarray, valid: bool) -> Dict[str, torch.Tensor]:
        """The micro-batch of sample ids `ids` of the training (or held-out) order."""

    @abstractmethod
    def _samples_source(self) -> str:
        """Where num_samples comes from and how to get more (ends the past-the-end error)."""

    def record_reads(self, checkpoint_dir: Union[str, Path], stage_name: str, consumed_samples: int) -> Optional[str]:
        """At the stage's end (rank 0): write what later stages must know of the data this stage
        read under `checkpoint_dir`, and return the record's name for the stage's .done; None when
        later stages depend on nothing it read."""
        return None

    # ------------------------------------------------------------------------------ tokenizer
    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise DataError when the blend's tokenizer has ids the model's embedding cannot hold."""
        if self.tokenizer.vocab_size > model_vocab_size:
            raise DataError(f"model.vocab_size: {model_vocab_size} is smaller than the vocabulary "
                            f"({self.tokenizer.vocab_size}) of tokenizer {self.tokenizer.path} used by "
                            f"{self.blend_path}")

    def tokenizer_record(self) -> dict:
        """What checkpoints record of the tokenizer (megafox-to-hf ships it), with the chat template
        of SFT data, so the exported tokenizer formats chats as the model was trained."""
        record = self.tokenizer.info()
        if self.chat_template:
            record["chat_template"] = self.chat_template
        return record
