"""Training data: a curriculum stage's blend.json read through megatron-core's GPT datasets.

- `stage_data.StageData`: the stage's global sample order, DP-sharded micro-batches, held-out
  validation batches, and no re-reading of documents earlier stages trained on.
- `tokenizer.load_tokenizer`: a SentencePiece `.model` as the tokenizer object megatron expects.
- `blend.read_blend`: the blend.json contract, checked, with errors naming file and field.

Importing this package loads nothing heavy; `stage_data` pulls in megatron-core.
"""
