"""Rank bodies for the ragged-generation tests (run by tests.support.distributed): megafox's
greedy generation over prompts of different lengths in one batch, with every model forward
counted by wrapping the chunks' forward from here (production code has no counter)."""
import dataclasses

import torch
from megatron.core import parallel_state as ps

from megafox.config import BuildConfig
from megafox.formats.tokenizer import load_tokenizer
from megafox.eval.lm import MegafoxLM
from megafox.eval.scorer import CollectiveScorer, serve_while
from megafox.model.build import build_model
from tests.support.layout import current_parallel, load_hf_weights
from tests.eval.eval_helpers import sharp_attention_state, tiny_model


class _Request:
    def __init__(self, args):
        self.args = args
        self.task_name = "ragged"


def generate(tokenizer, prompts, until, max_gen_toks, batch_size, impl):
    """Greedy generations for `prompts` (one batch when batch_size >= len(prompts)) and the input
    shape [batch, tokens] of every forward of the first model chunk on this rank."""
    model = dataclasses.replace(tiny_model(), transformer_impl=impl)
    parallel = current_parallel(use_distributed_optimizer=False)
    chunks = build_model(model, parallel, BuildConfig(precision="fp32"))
    load_hf_weights(chunks, sharp_attention_state(model), model, parallel)
    for chunk in chunks:
        chunk.eval()
    shapes = []
    forward = chunks[0].forward

    def counted(input_ids, *args, **kwargs):
        if input_ids is not None:
            shapes.append(tuple(input_ids.shape))
        return forward(input_ids, *args, **kwargs)

    chunks[0].forward = counted
    scorer = CollectiveScorer(chunks, model.vocab_size, batch_size)
    lm = MegafoxLM(scorer, load_tokenizer(tokenizer), model.max_position_embeddings, progress=False)
    kwargs = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False}
    texts = serve_while(scorer, lambda: lm.generate_until([_Request((p, dict(kwargs))) for p in prompts]))
    return {"texts": texts, "shapes": shapes, "prefills_ragged": scorer.prefills_ragged,
            "first_stage": ps.is_pipeline_first_stage()}
