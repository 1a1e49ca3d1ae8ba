"""The exported HF tokenizer gives SentencePiece's ids on real text, for any special-id layout."""
import json

import pytest

from checkpoints_tools.hf_tokenizer import write_hf_tokenizer
from tests.support.text import code_and_prose


@pytest.mark.parametrize("layout", ["fox", "gemma"])
def test_hf_tokenizer_ids_equal_sentencepiece(sp_models, tmp_path, layout):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_models[layout]))
    ids = write_hf_tokenizer(sp_models[layout], tmp_path, model_max_length=1 << 20)
    assert ids == {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == \
        (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id())
    total = 0
    for text in code_and_prose():
        expected = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == expected, text[:60]
        assert hf.encode(text) == [sp.bos_id()] + expected  # bos added, like Llama/Gemma
        assert hf.decode(expected) == sp.decode(expected)
        total += len(expected)
    assert total > 50_000  # a real amount of code and prose was compared
    assert len(set(sp.encode("".join(code_and_prose())))) > 500  # most of the vocabulary is exercised


def test_gemma_user_defined_symbols_match(sp_models, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_models["gemma"]))
    write_hf_tokenizer(sp_models["gemma"], tmp_path, 1024)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "<start_of_turn>user\nprint('hi')<end_of_turn>\n"
    assert hf.encode(text, add_special_tokens=False) == sp.encode(text)
    assert sp.piece_to_id("<start_of_turn>") in sp.encode(text)


def test_tokenizer_config_names_special_pieces(sp_models, tmp_path):
    write_hf_tokenizer(sp_models["gemma"], tmp_path, 2048)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>" and cfg["model_max_length"] == 2048
    assert (tmp_path / "tokenizer.model").read_bytes() == sp_models["gemma"].read_bytes()
