"""Single-rank bodies (run under torchrun so megatron-core's parallel state is real)."""
import torch

from megafox.config import fox1_1p6b, fox1_tiny
from megafox.model.build import build_model
from megafox.model.hf_mapping import RankKey, hf_to_megatron, load_rank_state, megatron_to_hf, rank_state
from tests.support.hf_reference import hf_llama
from tests.support.layout import current_parallel


def logits_vs_hf(impl, untied=False):
    model = fox1_tiny()
    model.transformer_impl = impl
    model.tie_word_embeddings = not untied
    hf = hf_llama(model, seed=11)
    chunk = build_model(model, current_parallel())[0].eval()
    load_rank_state(chunk, hf_to_megatron(hf.state_dict(), model)[RankKey(0, 0, 0)])
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.vocab_size, (2, 48), generator=g)
    positions = torch.arange(48).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ours = chunk(ids, positions, None)
        theirs = hf(ids).logits
    back = megatron_to_hf({RankKey(0, 0, 0): rank_state(chunk)}, model)
    expected = {k: v for k, v in hf.state_dict().items() if not (k == "lm_head.weight" and not untied)}
    return {"padded_vocab": ours.shape[-1], "ours": ours[..., :model.vocab_size], "theirs": theirs,
            "padding_logits": ours[..., model.vocab_size:], "back": back, "expected": expected}


def meta_parameter_count():
    model = fox1_1p6b()
    model.transformer_impl = "local"
    with torch.device("meta"):
        chunk = build_model(model, current_parallel())[0]
    return sum(p.numel() for p in chunk.parameters())


def sharded_names_and_shapes(untied=False):
    """What megatron-core itself names and shapes: the module's own parameter names of one layer
    (local spec) and every ShardedTensor its sharded_state_dict saves (key -> global, local shape)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    model = fox1_tiny()
    model.transformer_impl = "local"
    model.tie_word_embeddings = not untied
    chunk = build_model(model, current_parallel())[0]
    layer0 = sorted(k[len("decoder.layers.0."):] for k, v in chunk.state_dict().items()
                    if k.startswith("decoder.layers.0.") and not k.endswith("_extra_state"))
    saved = {}
    for t in nested_values(chunk.sharded_state_dict()):
        if isinstance(t, ShardedTensorFactory):  # SwiGLU fc1 at TP>1: gate and up saved as two pieces
            pieces = [p for p in nested_values(t.build()) if isinstance(p, ShardedTensor)]
            assert {p.key for p in pieces} == {t.key} and len({p.global_shape for p in pieces}) == 1
            saved[t.key] = {"global": tuple(pieces[0].global_shape), "local": tuple(t.data.shape)}
        elif isinstance(t, ShardedTensor):
            saved[t.key] = {"global": tuple(t.global_shape), "local": tuple(t.local_shape)}
    return {"layer0": layer0, "saved": saved, "padded_vocab": model.padded_vocab_size(current_parallel().tp)}
