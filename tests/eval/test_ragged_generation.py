"""Greedy generation over prompts of different lengths in one batch: token for token what
transformers generates for each prompt alone (unpadded), in one prefill forward plus at most
max_gen_toks decoding forwards (the KV cache), and in at most max_gen_toks pipeline passes
(the pipeline, which recomputes). Forwards are counted by wrapping the model's forward from the
test side (tests/eval/gen_bodies.py)."""
import pytest
import torch

from megafox.formats.tokenizer import load_tokenizer
from tests.support.distributed import run_distributed
from tests.support.hf_reference import hf_llama
from tests.eval.eval_helpers import sharp_attention_state, tiny_model
from tests.support.text import stdlib_texts

pytestmark = pytest.mark.slow  # each runs the model under torchrun

MAX_GEN = 12
BODY = "tests/eval/gen_bodies.py:generate"


def _prompts():
    """Six real-text prompts from 3 to ~260 tokens, in no particular order."""
    text = stdlib_texts(["argparse.py"])[0]
    return [text[2000:2012], text[5000:6100], text[9000:9200], text[12000:12040], text[15000:15600],
            text[20000:20400]]


@pytest.fixture(scope="module")
def reference(staged):
    """transformers' greedy continuation of each prompt alone, and a stop string that one of them
    reaches after a few tokens (so that sequence stops early while the others go on)."""
    model = tiny_model()
    hf = hf_llama(model)
    hf.load_state_dict(sharp_attention_state(model))
    tok = load_tokenizer(str(staged["tokenizer"]))
    prompts = _prompts()
    generated = []
    for prompt in prompts:
        ids = torch.tensor([[tok.bos] + tok.encode(prompt)])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_GEN, do_sample=False,
                              eos_token_id=tok.eos, pad_token_id=tok.eos)
        new = out[0, ids.shape[1]:].tolist()
        generated.append(new[:new.index(tok.eos)] if tok.eos in new else new)
    lengths = [len(tok.encode(p)) + 1 for p in prompts]
    assert min(lengths) <= 6 and max(lengths) >= 200, lengths
    # the text of one sequence's 4th token: it stops there, the others run on
    stop = next(tok.decode(g[:4])[len(tok.decode(g[:3])):].strip() for g in generated
                if len(tok.decode(g[:4])[len(tok.decode(g[:3])):].strip()) >= 2)
    until = [stop, "\n\n\n\n"]
    texts = []
    for g in generated:
        text = tok.decode(g)
        for s in until:
            text = text.split(s)[0]
        texts.append(text)
    assert any(len(t) < len(tok.decode(g)) for t, g in zip(texts, generated))  # the stop string cuts one
    return {"prompts": prompts, "until": until, "texts": texts, "lengths": lengths,
            "tokenizer": str(staged["tokenizer"])}


def _run(reference, nproc=1, layout=None, impl="native", batch_size=16):
    return run_distributed(BODY, nproc, layout or {},
                           dict(tokenizer=reference["tokenizer"], prompts=reference["prompts"],
                                until=reference["until"], max_gen_toks=MAX_GEN, batch_size=batch_size, impl=impl))


@pytest.mark.parametrize("impl", ["native", "local"])
def test_kv_cache_one_prefill_then_one_forward_per_token(reference, impl):
    out = _run(reference, impl=impl)
    assert out["texts"] == reference["texts"]
    assert out["prefills_ragged"]
    n, longest = len(reference["prompts"]), max(reference["lengths"])
    prefill, *steps = out["shapes"]
    assert prefill == (n, longest)  # every prompt, whole, in one forward
    assert all(shape == (n, 1) for shape in steps) and len(steps) <= MAX_GEN


@pytest.mark.multirank
def test_pipeline_at_most_max_gen_toks_passes(reference):
    """PP2 (no KV cache): each pass recomputes the batch's sequences; two micro-batches per pass."""
    out = _run(reference, nproc=2, layout={"pipeline_model_parallel_size": 2})
    assert out["texts"] == reference["texts"]
    assert out["first_stage"] and len(out["shapes"]) <= 2 * MAX_GEN
    assert out["shapes"][0][0] == len(reference["prompts"]) // 2
