"""What the tests share: test data (tokenizers, indexed datasets, blends, real text), processes
(ports, CLI runners, multi-rank bodies) and comparisons. One import style: `from tests.support.X import Y`."""
