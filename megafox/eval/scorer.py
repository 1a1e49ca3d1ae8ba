"""Log-probabilities and greedy tokens from megatron-core model chunks, in any TP/PP/DP layout.

One primitive serves every lm_eval request type: for each sequence, the log-probability of given
target tokens at its last positions and the argmax token there (loglikelihood = the targets'
sum and "all greedy"; generation = the argmax at the last position). Greedy generation has a
faster path where the layout allows it (one pipeline stage, no sequence parallelism): incremental
decoding with megatron-core's static KV cache (`StaticInferenceContext`), one token per step.

Prompts of different lengths share one cache in one prefill: they are right-padded (causal
attention keeps a prompt's tokens from seeing the padding after them), and every decoded token is
written at the same cache slot for the whole batch, so a shorter prompt's cache has a gap of
padding slots between its prompt and its generated tokens. Decoding masks the gap out, and RoPE
rotates each sequence's slots by its own positions (slot j is position j before the gap and
j - gap after it), so every sequence attends exactly as it would alone, as transformers computes
it unpadded. This needs core attention that applies a key mask while decoding (megatron-core's
local `DotProductAttention`, megafox's `SDPAttention`); Transformer Engine's ignores the mask
when megatron-core asks it for no_mask, so there a batch of ragged prompts is fed in lockstep
from the shortest prompt's length instead (`prefills_ragged`).

Multi-rank: global rank 0 drives (it runs lm_eval); every `score` call broadcasts the sequences
to all ranks, each data-parallel replica takes every dp-th sequence and runs the forward
collectively through megatron-core's pipeline schedule (forward_only), and the replicas' last
pipeline stages send their results back to rank 0. The other ranks sit in `serve()` until rank 0
calls `close()`.

The LM head runs on the scored positions only (a forward pre-hook on the output layer picks their
hidden states): with a 256K vocabulary, logits for every context token would cost
context/continuation times the memory of the ones actually used. Log-softmax and argmax are
computed on each tensor-parallel rank's vocabulary shard and reduced over the TP group, so full
logits are never gathered either.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megafox.checkpoint.state import unwrap
from megafox.model.attention import SDPAttention
from megafox.runtime.dist import rank


@dataclass
class ScoreItem:
    tokens: List[int]  # the model input
    targets: List[int]  # the input's last len(targets) positions predict these tokens
    # the input positions that predict `targets`, when not the last len(targets) ones: several
    # one-token continuations of the same context are scored at its last position in one row
    positions: Optional[List[int]] = None


@dataclass
class ScoreResult:
    logprobs: List[float]  # log p(target) at each scored position
    greedy: List[int]  # the argmax token at each scored position


_SCORE, _STOP, _GEN_START, _GEN_STEP, _GEN_END = "score", "stop", "gen_start", "gen_step", "gen_end"


class CollectiveScorer:
    """Scores `ScoreItem`s with this rank's model chunks (bare, Float16Module- or DDP-wrapped).

    `vocab_size` is the real vocabulary: the embedding's padding rows (Megatron pads it to a
    multiple of 128 x TP) are excluded from the softmax, as in the exported HF model.
    `batch_size` is the most sequences one replica runs per forward.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], vocab_size: int, batch_size: int = 16):
        from megatron.core import parallel_state as ps

        self.chunks = list(chunks)
        self.models = [unwrap(c) for c in self.chunks]
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.config = self.models[0].config
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.rank = rank()
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.tp, self.tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.holds_results = ps.is_pipeline_last_stage(ignore_virtual=True) and self.tp_rank == 0
        self.device = next(self.models[0].parameters()).device
        self._selection: Optional[torch.Tensor] = None
        self._hooked = False
        self._generation: Optional[_Generation] = None  # this replica's KV cache while generating

    @property
    def replicas(self) -> int:
        return self.dp

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------ driver side
    def score(self, items: List[ScoreItem]) -> List[ScoreResult]:
        """Rank 0 (the only caller): results in the order of `items`."""
        return self._collective(_SCORE, items, len(items))

    def close(self) -> None:
        """Rank 0: release the serving ranks."""
        if self.world > 1:
            self._broadcast((_STOP, None, 0))

    @property
    def caches_kv(self) -> bool:
        """Whether `generate_*` is available: megatron-core's static KV cache is used here with one
        pipeline stage (and one model chunk) and without sequence parallelism."""
        return self.pp == 1 and len(self.chunks) == 1 and not self.config.sequence_parallel

    @property
    def prefills_ragged(self) -> bool:
        """Whether `generate_start` takes prompts of different lengths in one prefill: the core
        attention must apply a key mask while decoding (see the module docstring)."""
        core = self.models[0].decoder.layers[0].self_attention.core_attention
        return self.caches_kv and isinstance(core, (DotProductAttention, SDPAttention))

    def generate_start(self, prompts: List[List[int]], prefix: int, capacity: int) -> List[int]:
        """Rank 0: open a KV cache of `capacity` positions for `prompts`, run the first `prefix`
        tokens of each (all of a shorter prompt; prompts of different lengths only where
        `prefills_ragged`) in one forward and return each one's argmax token after them."""
        return self._collective(_GEN_START, (prompts, prefix, capacity), len(prompts))

    def generate_step(self, tokens: List[int]) -> List[int]:
        """Rank 0: append one token to every sequence; the argmax token after it, per sequence."""
        return self._collective(_GEN_STEP, tokens, len(tokens))

    def generate_end(self) -> None:
        self._collective(_GEN_END, None, 0)

    # ----------------------------------------------------------------------------- serving side
    def serve(self) -> None:
        """Every rank but 0: run the forwards rank 0 asks for until it calls `close()`."""
        while True:
            command, payload, count = self._broadcast(None)
            if command == _STOP:
                return
            self._run_and_gather(command, payload, count)

    def _broadcast(self, message):
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _collective(self, command: str, payload, count: int):
        if self.world > 1:
            self._broadcast((command, payload, count))
        return self._run_and_gather(command, payload, count)

    def _run_and_gather(self, command: str, payload, count: int) -> list:
        """This replica's share (every dp-th sequence) of `command`; rank 0 gets every share back."""
        mine = list(range(self.dp_rank, count, self.dp))
        if command == _SCORE:
            results = self._score_replica([payload[i] for i in mine])
        elif command == _GEN_START:
            results = self._generation_start(mine, *payload)
        elif command == _GEN_STEP:
            results = self._generation_step([payload[i] for i in mine])
        else:
            self._generation = None  # frees the cache
            results = []
        if self.world == 1:
            return results
        sent = list(zip(mine, results)) if self.holds_results else None
        gathered = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(sent, gathered, dst=0)
        if self.rank != 0:
            return []
        out = [None] * count
        for part in gathered:
            for index, result in part or ():
                out[index] = result
        return out

    # -------------------------------------------------------------- one replica's KV-cached decoding
    def _generation_start(self, mine: List[int], prompts: List[List[int]], prefix: int, capacity: int) -> List[int]:
        from megatron.core.inference.contexts import StaticInferenceContext

        if not mine:
            self._generation = None
            return []
        rows = [prompts[i][:prefix] for i in mine]
        lengths = torch.tensor([len(r) for r in rows])
        longest = int(lengths.max())
        cache = StaticInferenceContext(max_batch_size=len(rows), max_sequence_length=capacity)
        # the LM head runs on each prompt's own last position (the selection hook), not the row's
        cache.materialize_only_last_token_logits = False
        generation = _Generation(cache)
        if int(lengths.min()) != longest:
            slots = torch.arange(capacity).unsqueeze(1)  # [capacity, 1]
            gap = (longest - lengths).unsqueeze(0)  # [1, batch]
            generation.rope_index = torch.where(slots < longest, slots, slots - gap).to(self.device)
            # megatron's masks mark the keys to drop with True: [batch, 1, 1, capacity]
            generation.mask = ((slots >= lengths) & (slots < longest)).t()[:, None, None, :].to(self.device)
        self._generation = generation
        tokens = torch.zeros(len(rows), longest, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens[r, :len(row)] = torch.tensor(row)
        return self._decode(tokens.to(self.device), (lengths - 1).unsqueeze(1).to(self.device))

    def _generation_step(self, tokens: List[int]) -> List[int]:
        if self._generation is None:
            return []
        tokens = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        return self._decode(tokens, torch.zeros_like(tokens))

    def _decode(self, tokens: torch.Tensor, last: torch.Tensor) -> List[int]:
        """Run `tokens` [batch, n] at the cache's current slot; the argmax after position `last`
        [batch, 1] of each row."""
        generation = self._generation
        cache = generation.cache
        start = cache.sequence_len_offset
        positions = torch.arange(start, start + tokens.shape[1], device=self.device).unsqueeze(0).expand_as(tokens)
        # the prefill is causal: no mask needed (nor taken by every attention kernel)
        mask = generation.mask[..., :start + tokens.shape[1]] if generation.mask is not None and start else None
        with torch.no_grad(), self._scored_positions_only(), self._rope_per_sequence(generation.rope_index):
            self._selection = last
            # [batch, 1, padded vocab], gathered over TP
            logits = self.chunks[0](tokens, positions, mask, inference_context=cache, runtime_gather_output=True)
        cache.increment_sequence_len_offset(tokens.shape[1])
        cache.enable_decode_mode()
        return logits[:, -1, :self.vocab_size].argmax(dim=-1).tolist()

    @contextmanager
    def _rope_per_sequence(self, index: Optional[torch.Tensor]):
        """RoPE with each sequence's own positions: `index` [capacity, batch] is the position of
        each cache slot. megatron-core builds one [slots, 1, 1, dim] table for the batch and
        slices it per step; this hook hands it [slots, batch, 1, dim] instead, which the unfused
        RoPE broadcasts over the heads (the fused kernel takes one table, so it is off meanwhile)."""
        if index is None:
            yield
            return
        model = self.models[0]
        handle = model.rotary_pos_emb.register_forward_hook(lambda module, args, out: out[:, 0][index])
        fused = self.config.apply_rope_fusion
        self.config.apply_rope_fusion = False
        try:
            yield
        finally:
            handle.remove()
            self.config.apply_rope_fusion = fused

    # ------------------------------------------------------------------------ one replica's work
    def _score_replica(self, items: List[ScoreItem]) -> List[ScoreResult]:
        results: List[ScoreResult] = []
        for start in range(0, len(items), self.batch_size):
            results.extend(self._forward(items[start:start + self.batch_size]))
        return results

    def _forward(self, items: List[ScoreItem]) -> List[ScoreResult]:
        """One pass of the pipeline schedule over `items` (all ranks of this replica call it
        with the same items, so they agree on every shape)."""
        if not items:
            return []
        from megatron.core.pipeline_parallel import get_forward_backward_func

        micro_batches, mbs, seq = self._micro_batches(items)
        iterator = [iter(micro_batches) for _ in self.chunks] if len(self.chunks) > 1 else iter(micro_batches)
        with torch.no_grad(), self._scored_positions_only():
            outputs = get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=iterator,
                model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=mbs,
                forward_only=True, collect_non_loss_data=True)
        if not self.holds_results:
            return []
        logprobs = torch.cat([o["logprobs"] for o in outputs])
        greedy = torch.cat([o["greedy"] for o in outputs])
        return [ScoreResult(logprobs[i, :len(item.targets)].tolist(), greedy[i, :len(item.targets)].tolist())
                for i, item in enumerate(items)]

    def _micro_batches(self, items: List[ScoreItem]):
        """Right-padded [mbs, seq] micro-batches; rows past len(items) repeat the first item."""
        n = len(items)
        # with pipeline stages, several micro-batches keep every stage busy
        mbs = n if self.pp == 1 else max(1, math.ceil(n / self.pp))
        count = math.ceil(n / mbs)
        if len(self.chunks) > 1:  # the interleaved schedule runs micro-batches in groups of pp
            count = math.ceil(count / self.pp) * self.pp
        multiple = 8 * (self.tp if self.config.sequence_parallel else 1)
        seq = math.ceil(max(len(it.tokens) for it in items) / multiple) * multiple
        k = max(len(it.targets) for it in items)
        rows = [items[i] if i < n else items[0] for i in range(count * mbs)]
        tokens = torch.zeros(len(rows), seq, dtype=torch.long)
        select = torch.zeros(len(rows), k, dtype=torch.long)
        targets = torch.zeros(len(rows), k, dtype=torch.long)
        for r, item in enumerate(rows):
            length, m = len(item.tokens), len(item.targets)
            if item.positions is None and not 1 <= m <= length:
                raise ValueError(f"score item: {m} targets for {length} input tokens")
            tokens[r, :length] = torch.tensor(item.tokens)
            select[r, :m] = torch.arange(length - m, length) if item.positions is None else \
                torch.tensor(item.positions)
            select[r, m:] = length - 1
            targets[r, :m] = torch.tensor(item.targets)
        positions = torch.arange(seq).unsqueeze(0).expand(len(rows), seq)
        batches = []
        for b in range(count):
            rows_b = slice(b * mbs, (b + 1) * mbs)
            batches.append({"tokens": tokens[rows_b].to(self.device), "position_ids": positions[rows_b].to(self.device),
                            "select": select[rows_b].to(self.device), "targets": targets[rows_b].to(self.device)})
        return batches, mbs, seq

    def _forward_step(self, data_iterator: Iterator[Dict[str, torch.Tensor]], model: torch.nn.Module):
        batch = next(data_iterator)
        self._selection = batch["select"]  # read by the output-layer hook of this same forward
        output = model(batch["tokens"], batch["position_ids"], None)
        return output, partial(self._score_output, batch)

    # --------------------------------------------------------------------- the last stage's math
    @contextmanager
    def _scored_positions_only(self):
        """Feed only the scored positions' hidden states to the LM head, for this forward.

        Not with sequence parallelism: there the output layer gathers the sequence itself, so the
        selection happens on the full logits instead (more memory, same numbers)."""
        handles = []
        if not self.config.sequence_parallel:
            for model in self.models:
                if model.post_process:
                    handles.append(model.output_layer.register_forward_pre_hook(self._select_hidden,
                                                                                with_kwargs=True))
        self._hooked = bool(handles)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._hooked = False
            self._selection = None

    def _select_hidden(self, module, args, kwargs):
        hidden = args[0]  # [seq, batch, hidden]
        index = self._selection.t().unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [k, batch, hidden]
        return (hidden.gather(0, index),) + tuple(args[1:]), kwargs

    def _score_output(self, batch: Dict[str, torch.Tensor], output: torch.Tensor, non_loss_data: bool = False):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = output  # [batch, k, vocab / tp] with the hook, else [batch, seq, vocab / tp]
        if not self._hooked:
            index = batch["select"].unsqueeze(-1).expand(-1, -1, logits.shape[-1])
            logits = logits.gather(1, index)
        logits = logits.float().contiguous()
        shard = logits.shape[-1]
        start = self.tp_rank * shard
        # the padded vocabulary rows are already -inf: FoxGPTModel masks them at its output layer
        greedy = self._vocab_parallel_argmax(logits, start)
        # megatron-core's vocab-parallel cross-entropy = -log_softmax(target) over the TP shards
        # (it works in place on `logits`, which is not needed afterwards)
        logprobs = -vocab_parallel_cross_entropy(logits, batch["targets"])
        return {"logprobs": logprobs.double().cpu(), "greedy": greedy.cpu()}

    def _vocab_parallel_argmax(self, logits: torch.Tensor, start: int) -> torch.Tensor:
        """torch.argmax over the whole vocabulary (first maximum on ties) from the TP shards."""
        values, index = logits.max(dim=-1)
        if self.tp == 1:
            return index
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        best = values.clone()
        torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=group)
        candidate = torch.where(values == best, index + start, torch.full_like(index, torch.iinfo(index.dtype).max))
        torch.distributed.all_reduce(candidate, op=torch.distributed.ReduceOp.MIN, group=group)
        return candidate


@dataclass
class _Generation:
    """One replica's decoding state: the KV cache, and for prompts of different lengths the RoPE
    position of every cache slot per sequence and the mask over the padding slots."""
    cache: object  # megatron-core StaticInferenceContext
    rope_index: Optional[torch.Tensor] = None  # [capacity, batch]
    mask: Optional[torch.Tensor] = None  # [batch, 1, 1, capacity], True = not attended


def serve_while(scorer: CollectiveScorer, drive):
    """Run `drive()` on rank 0 while every other rank serves its forwards; rank 0's result
    (None elsewhere). Rank 0 always releases the others, also when `drive` raises."""
    if not scorer.is_driver:
        scorer.serve()
        return None
    try:
        return drive()
    finally:
        scorer.close()
