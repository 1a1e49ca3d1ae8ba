"""Training data: a curriculum stage's blend.json read through megatron-core's GPT datasets.

- `batches.Batches`: what the trainer asks of a stage's data (micro-batches for a rank, validation
  batches, the pipeline shape, the tokenizer record), one protocol for every kind of stage;
  `kinds.open_stage_batches` picks the implementation by the stage's kind.
- `stage_data.StageData` (pretraining): the stage's global sample order, DP-sharded micro-batches, held-out
  validation batches, and no re-reading of documents earlier stages trained on.
- `sft_data.SFTData` (instruction tuning): conversations packed to seq_length, loss masks, epochs.
- `blend.read_blend`: a stage's blend.json (megafox/formats/blend.py) with its datasets opened and
  checked, errors naming file and field.  The tokenizer: megafox/formats/tokenizer.py.

Importing this package loads nothing heavy; `stage_data` pulls in megatron-core.
"""
