"""The shared test helpers do what the tests rely on, checked against independent references:
SentencePiece's own file-input training, megatron-core's and the trainer's readers, and the
environment a command really sees."""
import json

import numpy as np
import pytest

from tests.support.indexed import read_indexed, write_blend, write_indexed
from tests.support.processes import REPO, assert_one_line_error, clean_env, run_module, run_python
from tests.support.text import paragraphs, stdlib_texts
from tests.support.tokenizers import encode_documents, train_sentencepiece


def _pieces(model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def test_train_sentencepiece_equals_training_on_an_input_file(tmp_path):
    import sentencepiece as spm

    texts = stdlib_texts(["json/*.py"])
    corpus = tmp_path / "corpus.txt"  # whole files, blank and whitespace-only lines included
    corpus.write_text("\n".join(texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "file"), vocab_size=500,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    model = train_sentencepiece(tmp_path / "ours", texts, 500, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    assert model == tmp_path / "ours" / "tokenizer.model"
    assert _pieces(model) == _pieces(tmp_path / "file.model")  # SentencePiece's defaults are ids 0, 1, 2

    sp = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(tmp_path / "fox", texts, 500)))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)  # Fox-1's by default
    docs = paragraphs(texts, 5)
    assert encode_documents(sp, docs, max_tokens=4) == [sp.encode(d)[:4] + [2] for d in docs]


def test_indexed_datasets_and_blends_read_back_by_megatron_and_the_trainer(tmp_path):
    from megafox.data.blend import read_blend

    docs = [[5, 6, 7], [8], list(range(9, 300))]
    prefix = write_indexed(tmp_path / "data" / "d", docs)
    assert read_indexed(prefix)[0] == docs
    tokenizer = train_sentencepiece(tmp_path / "tok", stdlib_texts(["json/*.py"]), 400)
    path = write_blend(tmp_path / "stage1" / "blend.json", tokenizer, [(prefix, 0.5)], 1000, "stage1", counts=True)
    raw = json.loads(open(path).read())
    assert raw["datasets"] == [{"prefix": "../data/d", "weight": 0.5, "documents": 3, "tokens": 295}]
    blend = read_blend(path)  # it checks the counts against the .idx
    assert blend.stage == "stage1" and blend.token_budget == 1000 and blend.tokenizer == str(tokenizer)
    assert np.array_equal(blend.datasets[0].lengths, [3, 1, 291])


def test_commands_run_outside_any_torchrun_job_and_fail_checked(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    env = clean_env(EXTRA=1)
    assert "RANK" not in env and env["OMP_NUM_THREADS"] == "1" and env["EXTRA"] == "1"
    proc = run_python("-c", "import os, tests.support; print(os.environ.get('RANK'), os.getcwd())")
    assert proc.stdout.split() == ["None", str(REPO)]  # and the repository importable from its root

    bad = run_module("megafox.cli", "info", "--tp", "3")  # 16 heads do not split 3 ways
    line = assert_one_line_error(bad, "parallel.tensor_model_parallel_size", "divisible by tp (3)")
    assert line.startswith("megafox: error: ")
    with pytest.raises(AssertionError, match="exited with 2"):
        run_module("megafox.cli", "info", "--tp", "3", check=True)
    with pytest.raises(AssertionError):
        assert_one_line_error(run_module("megafox.cli", "info", "--tp", "2"))  # exit 0: not a failure


def test_every_test_runs_under_a_time_limit(request):
    """pytest-timeout is active with pytest.ini's limit, and an end-to-end test gets the longer one
    (tests/conftest.py): a hung test fails on its own instead of stalling CI."""
    from tests.conftest import SLOW_TIMEOUT_S, pytest_collection_modifyitems

    assert request.config.pluginmanager.hasplugin("timeout")
    assert request.config.getini("timeout") == "300" and request.config.getini("timeout_method") == "signal"
    item = request.node
    assert item.get_closest_marker("timeout") is None  # a unit test: the ini's default applies
    item.add_marker(pytest.mark.slow)
    pytest_collection_modifyitems(request.config, [item])
    assert item.get_closest_marker("timeout").args == (SLOW_TIMEOUT_S,)
