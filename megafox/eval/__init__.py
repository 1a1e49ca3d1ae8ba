"""Downstream evaluation with EleutherAI's lm-evaluation-harness (the `eval` extra).

    suites.py            what to evaluate: `name[:shots]` task specs, the `fox1` suite, published scores
    tasks.py             lm_eval tasks loaded offline (staged data directory or HF datasets cache)
    scorer.py            log-probs / greedy tokens from megatron-core chunks in any TP/PP/DP layout
    lm.py                MegafoxLM: lm_eval's LM interface over the scorer
    runner.py            one task at a time through lm_eval, and the score read from its results
    report.py            results JSON + markdown table beside the published Fox-1 numbers
    checkpoint_model.py  a checkpoint as model chunks to score
    cli.py               `megafox eval`
    config.py            EvalConfig, the training config's `eval:` section (the in-loop evaluator is
                         megafox.training.callbacks.downstream_eval)
"""
