"""What the tests share, one module per job; one import style: `from tests.support.<module> import <name>`.

text        real text read offline (CPython's standard library, license texts)
tokenizers  SentencePiece models trained on it, documents encoded with them
indexed     Megatron indexed datasets (tokens, SFT masks) and the blend.json files naming them
processes   the repository root, free ports, commands run as a user runs them, one-line errors
compare     one optimizer step of two runs compared weight by weight
distributed a test body run on N ranks under torchrun (`python -m tests.support.distributed`)
layout      the parallel layout of a rank, HF weights loaded into it and gathered back
hf_reference  the transformers Llama model the tests compare megafox with
faults      fault injectors: `python -m tests.support.faults ... -- <megafox-train args>` as the
            launchers' MEGAFOX_TRAIN_CMD (they put the checkout on PYTHONPATH, so every rank finds it)
"""
