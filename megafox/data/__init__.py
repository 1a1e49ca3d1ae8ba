"""Training data: a curriculum stage's blend.json read through megatron-core's GPT datasets.

- `stage_data.StageData`: the stage's global sample order, DP-sharded micro-batches, held-out
  validation batches, and no re-reading of documents earlier stages trained on.
- `blend.read_blend`: a stage's blend.json (megafox/formats/blend.py) with its datasets opened and
  checked, errors naming file and field.  The tokenizer: megafox/formats/tokenizer.py.

Importing this package loads nothing heavy; `stage_data` pulls in megatron-core.
"""
