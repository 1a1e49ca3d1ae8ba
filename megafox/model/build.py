"""Build a megatron-core `GPTModel` for a Fox-1 `ModelConfig` and a parallel layout.

Requires megatron-core's parallel_state to be initialized (see `megafox.parallel`). With
virtual pipeline parallelism it returns one model chunk per virtual stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megafox.config import ConfigError, ModelConfig, ParallelConfig
from megafox.model.fused_loss import DEFAULT_CHUNK_TOKENS
from megafox.model.specs import layer_spec, resolve_impl


@dataclass
class BuildOptions:
    """How to build (not what): precision and memory trade-offs, chosen per run."""

    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    recompute: str = "none"  # none | selective | full
    use_cpu_initialization: Optional[bool] = None  # default: True when there is no GPU
    fused_loss: bool = False  # chunked linear + cross-entropy (megafox.model.fused_loss)
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    # precompute: LM-head gradients computed in the forward (needs the loss_mask, which the
    # trainer passes); recompute: each chunk's logits recomputed in the backward
    loss_grad: str = "precompute"
    # eager | compiled: the per-chunk softmax/gradient as torch ops or torch.compile'd kernels
    loss_kernel: str = "eager"
    compile_layers: bool = False  # torch.compile each decoder layer (megafox.model.compile)


def transformer_config(model: ModelConfig, parallel: ParallelConfig,
                       options: BuildOptions = BuildOptions()) -> TransformerConfig:
    impl = resolve_impl(model.transformer_impl)
    if parallel.sequence_parallel and impl != "te":
        # megatron-core's plain-torch RMSNorm refuses sequence parallelism
        raise ConfigError("parallel.sequence_parallel: needs transformer_impl 'te' (Transformer Engine); "
                          f"the {impl!r} spec's RMSNorm does not support it")
    on_gpu = torch.cuda.is_available()
    cpu_init = options.use_cpu_initialization
    if cpu_init is None:
        cpu_init = not on_gpu
    # The fusions below need CUDA kernels (TE / apex / jit); they stay off on CPU.
    fused = on_gpu and impl == "te"
    recompute = {}
    if options.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif options.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif options.recompute != "none":
        raise ValueError(f"recompute: must be none, selective or full, got {options.recompute!r}")
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
        params_dtype=options.params_dtype,
        bf16=options.bf16,
        pipeline_dtype=options.params_dtype if parallel.pp > 1 else None,
        use_cpu_initialization=cpu_init,
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
                options: BuildOptions = BuildOptions()) -> List[GPTModel]:
    """One GPTModel per virtual pipeline stage held by this rank (a list of one without VPP)."""
    from megafox.model.gpt import FoxGPTModel

    config = transformer_config(model, parallel, options)
    spec = layer_spec(model.transformer_impl)
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in (range(vpp) if vpp else [None]):
        chunks.append(FoxGPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=model.padded_vocab_size(parallel.tp),
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model.rope_theta),
            vp_stage=vp_stage,
            fused_loss=options.fused_loss,
            loss_chunk_tokens=options.loss_chunk_tokens,
            loss_grad=options.loss_grad,
            loss_kernel=options.loss_kernel,
        ))
    if options.compile_layers:
        from megafox.model.compile import compile_decoder_layers

        for chunk in chunks:
            compile_decoder_layers(chunk)
    return chunks
