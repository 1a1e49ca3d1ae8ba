"""Build a megatron-core `GPTModel` for a Fox-1 `ModelConfig` and a parallel layout.

Requires megatron-core's parallel_state to be initialized (`megafox.parallel.process_groups`).
megatron-core's GPTModel takes its part of the layout at construction (TP-sharded linear layers,
this pipeline stage's layers, the embedding on the first stage and the LM head on the last), so
with virtual pipeline parallelism this returns one model chunk per virtual stage. The rest of
the parallelism (bf16, DDP, the distributed optimizer) is applied from outside:
`megafox.parallel.parallelize`.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megafox.config import BuildConfig, ConfigError, ModelConfig, ParallelConfig
from megafox.model.compile import compile_decoder_layers
from megafox.model.gpt import FoxGPTModel
from megafox.model.specs import layer_spec, resolve_impl


def uses_bf16(build: BuildConfig) -> bool:
    """`precision: auto` is bf16 on a GPU and fp32 on a CPU."""
    return build.precision == "bf16" or (build.precision == "auto" and torch.cuda.is_available())


def transformer_config(model: ModelConfig, parallel: ParallelConfig,
                       build: BuildConfig = BuildConfig()) -> TransformerConfig:
    impl = resolve_impl(model.transformer_impl)
    if parallel.sequence_parallel and impl != "te":
        # megatron-core's plain-torch RMSNorm refuses sequence parallelism
        raise ConfigError("parallel.sequence_parallel: needs transformer_impl 'te' (Transformer Engine); "
                          f"the {impl!r} spec's RMSNorm does not support it")
    on_gpu = torch.cuda.is_available()
    bf16 = uses_bf16(build)
    params_dtype = torch.bfloat16 if bf16 else torch.float32
    # The fusions below need CUDA kernels (TE / apex / jit); they stay off on CPU.
    fused = on_gpu and impl == "te"
    recompute = {}
    if build.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif build.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    interleaved = (parallel.virtual_pipeline_model_parallel_size or 1) > 1
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype if parallel.pp > 1 else None,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=fused,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=False,
        gradient_accumulation_fusion=fused,
        cross_entropy_loss_fusion=on_gpu,
        # Loss = mean over every loss token of the global batch, whatever the layout: DDP then
        # sums (not averages) grads and finalize_model_grads divides by the global token count.
        calculate_per_token_loss=True,
        # With virtual stages and pp=2 a rank's previous and next stage are the same peer, so the
        # batched isend/irecv pairs a forward activation with a backward gradient of the same
        # shape (silently wrong). Megatron-LM's default with VPP avoids it: unbatched p2p, which
        # sends the two directions over different groups, overlapped with compute.
        batch_p2p_comm=not interleaved,
        overlap_p2p_comm=interleaved,
        **recompute,
    )


def build_model(model: ModelConfig, parallel: ParallelConfig,
                build: BuildConfig = BuildConfig()) -> List[GPTModel]:
    """One GPTModel per virtual pipeline stage held by this rank (a list of one without VPP).
    Every chunk shares one TransformerConfig (`chunks[0].config`): DDP and Float16Module take it
    from there rather than building a second one."""
    config = transformer_config(model, parallel, build)
    spec = layer_spec(model.transformer_impl, packed_attention=build.packed_attention)
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in (range(vpp) if vpp else [None]):
        chunks.append(FoxGPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=model.padded_vocab_size(parallel.tp),
            real_vocab_size=model.vocab_size,  # the padded rows are left out of every softmax
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model.rope_theta),
            vp_stage=vp_stage,
            fused_loss=build.fused_loss,
            loss_chunk_tokens=build.loss_chunk_tokens,
            loss_grad=build.loss_grad,
            loss_kernel=build.loss_kernel,
        ))
    if build.compile_layers:
        for chunk in chunks:
            compile_decoder_layers(chunk)
    return chunks
