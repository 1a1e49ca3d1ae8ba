"""`MegafoxLM`: an lm_eval language model over megafox's own model chunks (in-process, any layout).

Why in-process instead of exporting to a temporary HF directory and running lm_eval's `hf` model:
the same code then scores a checkpoint (`megafox eval --checkpoint`, at any TP/PP/DP under
torchrun, or in one process) and the model being trained (the in-loop evaluator, in the trainer's
own layout: no export, no second copy of the weights, which a 1.6B model sharded over a pipeline
could not afford on one rank anyway).

It reproduces what lm_eval's `hf` model computes on the model's HF export, so the scores are
comparable with published ones: the exported tokenizer's ids (SentencePiece's ids with BOS
prepended, as Llama/Gemma tokenizers do), the same left truncation to `max_length`, the same
continuation split (`TemplateLM._encode_pair`), log-softmax over the real vocabulary, greedy
generation that stops at EOS or at any `until` string. tests/eval checks per-example
loglikelihoods against lm_eval's `hf` model on the export within 1e-4.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from megafox.eval.scorer import CollectiveScorer, ScoreItem

DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's hf model's default


class MegafoxLM(TemplateLM):
    def __init__(self, scorer: CollectiveScorer, tokenizer, max_length: int, name: str = "megafox",
                 add_bos: Optional[bool] = None, progress: bool = True):
        super().__init__()
        self.scorer = scorer
        self.sp_tokenizer = tokenizer  # megafox.formats.tokenizer.SentencePieceTokenizer
        self._max_length = int(max_length)
        self.name = name
        # The exported HF tokenizer adds BOS whenever the model file has one (add_bos_token)
        self.add_bos = tokenizer.bos_id is not None if add_bos is None else add_bos
        self.progress = progress
        self._task: Optional[str] = None  # the task being scored, for progress bars

    # ------------------------------------------------------------------- what lm_eval asks for
    @property
    def eot_token_id(self) -> int:
        return self.sp_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.sp_tokenizer.bos_id
        return bos if bos is not None else self.sp_tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.sp_tokenizer.path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_name": self.name}

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(self._piece(self.prefix_token_id)):
            add = False  # the text already starts with BOS (lm_eval's has_bos_prefix rule)
        ids = self.sp_tokenizer.encode(string)
        return [self.prefix_token_id] + ids if add and self.sp_tokenizer.bos_id is not None else ids

    def tok_decode(self, tokens) -> str:
        return self.sp_tokenizer.decode(tokens)  # control pieces (BOS/EOS/PAD) decode to nothing

    def _piece(self, token_id: int) -> str:
        return self.sp_tokenizer.sp.IdToPiece(int(token_id))

    # ----------------------------------------------------------------------------- loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        self._task = requests[0].task_name if requests else None
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        items = []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"loglikelihood request with {len(context)} context and {len(continuation)} "
                                 f"continuation tokens (max_length {self.max_length})")
            whole = (context + continuation)[-(self.max_length + 1):]
            items.append(ScoreItem(whole[:-1], list(continuation)))
        # Requests with the same model input (the choices of a question whose continuations are
        # one token, e.g. MMLU's " A".." D") share one row, as lm_eval's hf model shares their logits
        groups = {}
        for i, item in enumerate(items):
            groups.setdefault(tuple(item.tokens), []).append(i)
        # longest first, like lm_eval's hf model: similar lengths share a batch
        order = sorted(groups, key=lambda tokens: (-len(tokens) - 1, tokens))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        per_call = self.scorer.batch_size * self.scorer.replicas
        bar = tqdm(total=len(requests), desc=self._desc("loglikelihood"), disable=disable_tqdm or not self.progress)
        for start in range(0, len(order), per_call):
            chosen = [groups[tokens] for tokens in order[start:start + per_call]]
            rows = [self._shared_row([items[i] for i in members]) for members in chosen]
            for members, out in zip(chosen, self.scorer.score(rows)):
                offset = 0
                for i in members:
                    m = len(items[i].targets)
                    answer = (float(sum(out.logprobs[offset:offset + m])),
                              out.greedy[offset:offset + m] == items[i].targets)
                    offset += m
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(members))
        bar.close()
        return results

    @staticmethod
    def _shared_row(items: List[ScoreItem]) -> ScoreItem:
        """One scorer row for items with the same input: every item's targets at its positions."""
        if len(items) == 1:
            return items[0]
        length = len(items[0].tokens)
        targets, positions = [], []
        for item in items:
            targets += item.targets
            positions += range(length - len(item.targets), length)
        return ScoreItem(items[0].tokens, targets, positions)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm_eval import utils

        self._task = requests[0].task_name if requests else None
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            rolling = utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                      prefix_token=self.prefix_token_id,
                                                      max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy decoding: incremental with megatron-core's KV cache where the layout allows
        (one pipeline stage), else each new token from a forward over the whole sequence."""
        from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                          postprocess_generated_text)

        self._task = requests[0].task_name if requests else None
        ordered = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                           group_by="gen_kwargs", group_fn=lambda r: r[1])
        per_call = self.scorer.batch_size * self.scorer.replicas
        bar = tqdm(total=len(requests), desc=self._desc("generate_until"), disable=disable_tqdm or not self.progress)
        results = []
        for chunk in ordered.get_batched(n=per_call, batch_fn=None):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError("megafox's in-process model decodes greedily; this task samples "
                                 "(do_sample=true): evaluate an HF export with --hf instead")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self._piece(self.eot_token_id))
            max_new = int(kwargs.pop("max_gen_toks"))
            for context, text in zip(contexts, self._greedy(contexts, until, max_new)):
                text = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
            bar.update(len(chunk))
        bar.close()
        return ordered.get_original(results)

    def _greedy(self, contexts, until: List[str], max_new: int) -> List[str]:
        room = self.max_length - max_new
        if room <= 0:
            raise ValueError(f"max_gen_toks ({max_new}) must be below max_length ({self.max_length})")
        prompts = [self.tok_encode(c)[-room:] for c in contexts]
        if self.scorer.caches_kv:
            return self._greedy_cached(prompts, until, max_new)
        generated: List[List[int]] = [[] for _ in contexts]
        active = list(range(len(contexts)))
        for _ in range(max_new):
            if not active:
                break
            outs = self.scorer.score([ScoreItem(prompts[i] + generated[i], [0]) for i in active])
            still = []
            for i, out in zip(active, outs):
                token = out.greedy[0]
                if token == self.eot_token_id:
                    continue
                generated[i].append(token)
                text = self.tok_decode(generated[i])
                if not any(stop and stop in text for stop in until):
                    still.append(i)
            active = still
        return [self.tok_decode(g) for g in generated]

    def _greedy_cached(self, prompts: List[List[int]], until: List[str], max_new: int) -> List[str]:
        """The same decoding against a KV cache: one forward reads every prompt (of any length)
        and predicts its first token, then one forward per new token for the whole batch, each
        sequence stopping at its own EOS / stop string. Where the attention kernel cannot mask
        the padding between a shorter prompt and its generated tokens (`prefills_ragged`), the
        batch starts after the shortest prompt instead and a longer prompt is fed its own next
        token until it ends (batches hold prompts of similar length, longest first)."""
        lengths = [len(p) for p in prompts]
        position = max(lengths) if self.scorer.prefills_ragged else min(lengths)
        predicted = self.scorer.generate_start(prompts, position, max(lengths) + max_new)
        generated: List[List[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        try:
            while True:
                feed = []
                for i, prompt in enumerate(prompts):
                    if position < lengths[i]:  # still reading its prompt: the prediction is not used
                        feed.append(prompt[position])
                        continue
                    if not done[i]:
                        token = predicted[i]
                        if token == self.eot_token_id:
                            done[i] = True
                        else:
                            generated[i].append(token)
                            text = self.tok_decode(generated[i])
                            done[i] = len(generated[i]) >= max_new or any(stop and stop in text for stop in until)
                    feed.append(generated[i][-1] if generated[i] else self.eot_token_id)
                if all(done):
                    break
                predicted = self.scorer.generate_step(feed)
                position += 1
        finally:
            self.scorer.generate_end()
        return [self.tok_decode(g) for g in generated]

    def _desc(self, kind: str) -> str:
        return f"{self._task or self.name}: {kind}"
