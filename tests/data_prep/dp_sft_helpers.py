"""Shared by tests/data_prep/test_sft_*.py: an exported HF tokenizer with a chat template, and the
reference loss mask computed with transformers alone (its rendering, its tokenizer's offsets)."""
import os
from pathlib import Path

from tests.support.processes import run_module

MISTRAL_WHEEL = "mistral-common==1.13.1"


def export_hf(model_file, out_dir, template_text):
    """The tokenizer megafox-to-hf writes, with the template; loaded back by transformers."""
    from transformers import AutoTokenizer

    from checkpoints_tools.hf_tokenizer import write_hf_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_hf_tokenizer(Path(model_file), out_dir, 1 << 20, chat_template=template_text)
    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)


def reference_mask(hf, messages):
    """1 on the tokens overlapping an assistant turn, as transformers sees it: the text each assistant
    message adds to the rendering of the conversation before it (with the generation prompt), located
    in the whole rendering through the HF tokenizer's own character offsets."""
    text = hf.apply_chat_template(messages, tokenize=False)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(hf.apply_chat_template(messages[:j], tokenize=False, add_generation_prompt=True))
            end = len(hf.apply_chat_template(messages[: j + 1], tokenize=False))
            assert text[:end] == hf.apply_chat_template(messages[: j + 1], tokenize=False)
            spans.append((start, end))
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    return [int(any(b < e2 and e > s2 for s2, e2 in spans)) for b, e in enc["offset_mapping"]], enc["input_ids"]


def trained_runs(ids, mask):
    """The maximal runs of consecutive target tokens, as lists of ids."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def mistral_model(tmp_dir, name="mistral_instruct_tokenizer_240323.model.v3"):
    """A real pretrained 32K SentencePiece BPE model (Mistral's, with [INST] control tokens), from the
    mistral-common wheel: installed, or fetched with pip into a cache; None when neither works."""
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("mistral_common")
    if spec and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "data" / name
        if p.is_file():
            return p
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megafox-tests" / "mistral"
    target = cache / name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    try:
        run_module("pip", "download", "-q", "--no-deps", MISTRAL_WHEEL, "-d", tmp_dir, check=True, timeout=120)
        wheel = next(Path(tmp_dir).glob("mistral_common-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read(f"mistral_common/data/{name}")
    except Exception:
        return None
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def sft(*args, check=True):
    """`python -m data_prep.sft ARGS`; a failure fails the test unless check=False."""
    return run_module("data_prep.sft", *args, check=check)
