"""The on-disk contracts between data_prep (the writer) and the trainer (the reader): one module per
format, and each is the only code that writes or parses its format.

- `indexed`: Megatron's `.bin/.idx` layout (token ids; an SFT stage's uint8 loss masks), dtype codes.
- `blend`: a stage's `blend.json`, pretraining and SFT, as one typed record.
- `tokenizer`: a SentencePiece `.model`: the one loader, its sha256, its special ids.
- `dtypes`: the names files record for numpy and torch dtypes.

Run records (checkpoint metadata) have their own module, `megafox/records.py`.  Free of torch and
megatron-core: data_prep imports this package and must start fast without the training stack.
"""
from __future__ import annotations

from megafox.config import ConfigError


class FormatError(ConfigError):
    """A file that does not hold what its format says; the message names the file and the field.

    A ConfigError, so the trainer's and the tools' commands print it as one line (exit status 2);
    data_prep's commands turn it into their DataPrepError where they call in."""
