"""Loglikelihood requests with the same model input (one-token continuations of one context, as
MMLU's " A".." D") share one scorer row, as lm_eval's hf model shares their logits, and get what
each would get in a row of its own."""
from types import SimpleNamespace

from megafox.eval.lm import MegafoxLM
from megafox.eval.scorer import ScoreResult


class ToyScorer:
    """log p(target at position i) = -(target + i + sum(input)) / 100; argmax: target 7."""
    batch_size, replicas = 4, 1

    def __init__(self):
        self.rows = []

    def score(self, items):
        self.rows += items
        out = []
        for item in items:
            positions = item.positions or range(len(item.tokens) - len(item.targets), len(item.tokens))
            out.append(ScoreResult([-(t + p + sum(item.tokens)) / 100 for t, p in zip(item.targets, positions)],
                                   [7 for _ in item.targets]))
        return out


def _lm(scorer):
    tokenizer = SimpleNamespace(bos_id=1, eos_id=2, path="toy")
    return MegafoxLM(scorer, tokenizer, max_length=64, progress=False)


def test_one_token_choices_share_a_row():
    context = [1, 10, 11, 12]
    requests = [(None, context, [c]) for c in (5, 6, 7, 8)] + [(None, context, [5, 9]), (None, [1, 3], [4])]
    shared = ToyScorer()
    got = _lm(shared)._loglikelihood_tokens(requests)
    alone = []
    for request in requests:  # each request in a row of its own: the reference
        alone += _lm(ToyScorer())._loglikelihood_tokens([request])
    assert got == alone
    assert [answer[1] for answer in got[:4]] == [False, False, True, False]
    assert len(shared.rows) == 3  # the four one-token choices in one row; the others alone
