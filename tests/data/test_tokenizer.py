"""megafox.formats.tokenizer: ids from the SentencePiece model, round trips, clear errors."""
import pytest
import sentencepiece as spm

from megafox.formats.tokenizer import TokenizerError, load_tokenizer
from tests.support.text import stdlib_texts
from tests.support.tokenizers import train_sentencepiece


def test_ids_and_round_trip(tok_model, tmp_path):
    tok = load_tokenizer(tok_model)
    sp = spm.SentencePieceProcessor(model_file=tok_model)
    assert tok.vocab_size == sp.get_piece_size() == 1000
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.unk_id) == (sp.eos_id(), sp.bos_id(), sp.pad_id(), sp.unk_id())
    assert tok.eod == tok.eos == tok.eos_id and tok.pad == tok.pad_id
    text = "def parse(self, fp): return json.loads(fp.read()) # Grüße 🦊"  # no runs of spaces: SentencePiece folds them
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids[1:-1] == sp.encode(text)
    assert tok.decode(ids[1:-1]) == text
    d = tmp_path / "dir"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(open(tok_model, "rb").read())
    assert load_tokenizer(str(d)).sha256 == tok.sha256


def test_undefined_pad_uses_megatron_sentinel(tmp_path):
    from megatron.core.datasets.megatron_dataset import _PAD_TOKEN_ID

    model = train_sentencepiece(tmp_path, stdlib_texts(["json/*.py"]), 300, name="nopad", byte_fallback=False,
                                pad_id=-1, bos_id=-1, eos_id=5, unk_id=0,
                                user_defined_symbols=["<a>", "<b>", "<c>", "<d>"])
    tok = load_tokenizer(str(model))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.pad) == (None, None, 5, _PAD_TOKEN_ID)
    with pytest.raises(TokenizerError, match="defines no bos"):
        tok.encode("x", bos=True)


def test_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "none.model")
    with pytest.raises(TokenizerError, match=f"tokenizer {missing}: no such file"):
        load_tokenizer(missing)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TokenizerError, match=f"tokenizer {junk}: not a SentencePiece model"):
        load_tokenizer(str(junk))
