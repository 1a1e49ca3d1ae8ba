"""Reading scores out of lm_eval's results, and the table beside the published Fox-1 numbers."""
import json
import math
import sys

import pytest

from megafox.eval.report import build_report, markdown, write_report
from megafox.eval.runner import TaskResult, read_result
from megafox.eval.suites import FOX1_SUITE, TaskSpec
from megafox.eval.tasks import LoadedTask


def _loaded(spec, kind="task", leaves=None):
    return LoadedTask(spec, spec.name, kind, [], leaves or [spec.name])


def test_group_scored_as_mean_of_subjects():
    """The leaderboard's MMLU: the plain mean of the subjects, not lm_eval's size-weighted group
    score; stderr of a mean of independent estimates: sqrt(sum s_i^2) / n."""
    accs, errs, sizes = [0.25, 0.5, 0.75], [0.04, 0.03, 0.05], [100, 300, 50]
    leaves = ["mmlu_a", "mmlu_b", "mmlu_c"]
    weighted = sum(a * n for a, n in zip(accs, sizes)) / sum(sizes)
    raw = {"results": {"mmlu": {"acc,none": weighted, "acc_stderr,none": 0.02, "alias": "mmlu"},
                       **{leaf: {"acc,none": a, "acc_stderr,none": e, "alias": leaf}
                          for leaf, a, e in zip(leaves, accs, errs)}},
           "n-samples": {leaf: {"original": n, "effective": n} for leaf, n in zip(leaves, sizes)}}
    result = read_result(_loaded(FOX1_SUITE[3], "group", leaves), raw, 1.5)
    assert (result.metric, result.filter, result.aggregation) == ("acc", "none", "subject_mean")
    assert result.value == pytest.approx(0.5) and result.value != pytest.approx(weighted)
    assert result.stderr == pytest.approx(math.sqrt(sum(e * e for e in errs)) / 3)
    assert result.samples == 450
    assert result.metrics["acc,none"] == pytest.approx(weighted)  # lm_eval's own group score is kept
    assert set(result.leaves) == set(leaves)


def test_task_metric_and_filter():
    raw = {"results": {"gsm8k": {"exact_match,strict-match": 0.3, "exact_match_stderr,strict-match": 0.01,
                                 "exact_match,flexible-extract": 0.4, "exact_match_stderr,flexible-extract": 0.01}},
           "n-samples": {"gsm8k": {"original": 1319, "effective": 1319}}}
    result = read_result(_loaded(FOX1_SUITE[5]), raw, 2.0)
    assert (result.metric, result.filter, result.value, result.samples) == ("exact_match", "strict-match", 0.3, 1319)
    # a task the suite does not know: acc_norm when reported (the leaderboard's choice), else acc
    raw = {"results": {"piqa": {"acc,none": 0.6, "acc_stderr,none": 0.01, "acc_norm,none": 0.7,
                                "acc_norm_stderr,none": 0.01}}, "n-samples": {"piqa": {"effective": 10}}}
    result = read_result(_loaded(TaskSpec("piqa")), raw, 1.0)
    assert (result.metric, result.value) == ("acc_norm", 0.7)


def _row(spec, value):
    return TaskResult(task=spec.name, label=spec.title, shots=spec.shots, metric=spec.metric, filter=spec.filter,
                      value=value, stderr=0.01, samples=100, seconds=1.0,
                      aggregation="subject_mean" if spec.subject_mean else "lm_eval")


def test_fox1_table(tmp_path):
    values = [0.40, 0.60, 0.35, 0.45, 0.58, 0.30]
    results = [_row(spec, v) for spec, v in zip(FOX1_SUITE, values)]
    report = build_report(results, {"kind": "checkpoint", "name": "fox", "path": "/c", "iteration": 7,
                                    "consumed_tokens": 1000}, {"limit": None, "layout": "TP1", "dtype": "bf16"},
                          "fox1", "0.4.13", {})
    assert report["average"] == {"value": pytest.approx(sum(values) / 6), "tasks": [s.name for s in FOX1_SUITE],
                                 "complete": True}
    md = markdown(report)
    assert "| HellaSwag | 10 | acc_norm | 60.00 | 1.00 | 62.82 | - |" in md
    assert "| GSM8K | 5 | exact_match (strict-match) | 30.00 | 1.00 | 36.39 | 39.20 |" in md
    assert "| MMLU | 5 | acc, mean of subjects | 45.00 |" in md
    # ARC-Challenge and MMLU were not published: no published average
    assert f"| **Average** |  |  | {100 * sum(values) / 6:.2f} |  | - | - |" in md
    assert "not comparable" not in md
    write_report(report, tmp_path / "r.json", tmp_path / "r.md")
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["published"]["Fox-1-1.6B"]["gsm8k"] == 36.39 and back["model"]["iteration"] == 7
    assert (tmp_path / "r.md").read_text() == md


def test_incomplete_suite_average_is_marked():
    results = [_row(FOX1_SUITE[0], 0.4), _row(FOX1_SUITE[1], None)]
    report = build_report(results, {"kind": "hf", "path": "/h"}, {"limit": 10}, "fox1", "0.4.13", {})
    assert report["average"]["complete"] is False and report["average"]["value"] == pytest.approx(0.4)
    md = markdown(report)
    assert "**Average** (incomplete)" in md and "At most 10 documents" in md
    assert json.loads(json.dumps(report, allow_nan=False))  # no NaN anywhere


def test_perplexity_shown_as_value_and_not_averaged():
    """wikitext-style rows: word perplexity is unbounded and lower-is-better, so it is shown as it
    is (not x100 in percent) and the average covers the accuracies only."""
    results = [_row(FOX1_SUITE[0], 0.40), _row(FOX1_SUITE[1], 0.60),
               TaskResult(task="wikitext", label="wikitext", shots=0, metric="word_perplexity", filter="none",
                          value=23.456, stderr=None, samples=62, seconds=3.0)]
    report = build_report(results, {"kind": "hf", "path": "/h"}, {}, None, "0.4.13", {})
    assert report["average"]["value"] == pytest.approx(0.5)
    assert report["average"]["tasks"] == ["arc_challenge", "hellaswag"] and report["average"]["complete"]
    md = markdown(report)
    assert "| wikitext | 0 | word_perplexity | 23.46 | - |" in md
    assert "| **Average** |  |  | 50.00 |  |" in md
    assert "perplexity-type as values (not averaged)" in md


def test_yaml_task_row_shows_task_name_and_lm_eval_shots(tmp_path):
    """A task given as a YAML file: the row is the task's name, not the file's path, and its shots
    are what lm_eval used (the YAML's num_fewshot), not "default"."""
    spec = TaskSpec(str(tmp_path / "tasks" / "docstring_mc.yaml"))
    raw = {"results": {"docstring_mc": {"acc,none": 0.5, "acc_stderr,none": 0.1}},
           "n-samples": {"docstring_mc": {"effective": 20}}, "n-shot": {"docstring_mc": 3}}
    result = read_result(LoadedTask(spec, "docstring_mc", "task", [], ["docstring_mc"]), raw, 1.0)
    assert (result.label, result.shots) == ("docstring_mc", 3)
    md = markdown(build_report([result], {"kind": "hf", "path": "/h"}, {}, None, "0.4.13", {}))
    assert "| docstring_mc | 3 | acc | 50.00 | 10.00 |" in md and ".yaml" not in md
    # a requested count wins over lm_eval's record of the default
    result = read_result(LoadedTask(TaskSpec(spec.name, 1), "docstring_mc", "task", [], ["docstring_mc"]),
                         dict(raw, **{"n-shot": {"docstring_mc": 1}}), 1.0)
    assert result.shots == 1


def test_no_progress_silences_lm_eval_bars(capsys):
    """lm_eval's own bars (a task's request building, bootstrap) go through the tqdm its modules
    import, with their own `disable` settings: --no-progress draws none of them."""
    import lm_eval.api.task  # noqa: F401  (the module whose bar is checked)
    import tqdm as package

    from megafox.eval.runner import lm_eval_progress

    def bars():
        for bar in (sys.modules["lm_eval.api.task"].tqdm, package.tqdm):
            for _ in bar(range(3), total=3, disable=False, mininterval=0):
                pass
        return capsys.readouterr().err

    with lm_eval_progress(False):
        assert bars() == ""
    assert "3/3" in bars()  # restored afterwards
    with lm_eval_progress(True):
        assert "3/3" in bars()
