"""`--suite fox1` against lm_eval's own registry, and the offline-data contract (no model needed)."""
import time

import pytest

from megafox.config import ConfigError
from megafox.eval.suites import FOX1_SUITE, parse_task_list, suite
from tests.eval.eval_helpers import run_eval, stage_arc
from tests.support.processes import assert_one_line_error

# The Open LLM Leaderboard v1 protocol as the Fox-1 report states it (task, shots, metric, filter)
LEADERBOARD = [("arc_challenge", 25, "acc_norm", "none"), ("hellaswag", 10, "acc_norm", "none"),
               ("truthfulqa_mc2", 0, "acc", "none"), ("mmlu", 5, "acc", "none"), ("winogrande", 5, "acc", "none"),
               ("gsm8k", 5, "exact_match", "strict-match")]


@pytest.fixture(scope="module")
def registry():
    from megafox.eval.tasks import offline_environment

    offline_environment()
    from lm_eval.tasks import TaskManager

    return TaskManager()


def test_fox1_suite_is_the_reports_table():
    assert [(s.name, s.shots, s.metric, s.filter) for s in suite("fox1")] == LEADERBOARD


def test_fox1_tasks_exist_in_lm_eval_with_those_metrics(registry):
    """Every suite task is in lm_eval's registry, and each of its leaf tasks reports the metric
    (under the filter) the suite reads: a renamed task or metric in lm_eval fails here."""
    from megafox.eval.tasks import resolve

    kinds = {}
    for spec in FOX1_SUITE:
        assert spec.name in registry.all_tasks, spec.name
        r = resolve(registry, spec)
        kinds[spec.name] = (r["kind"], len(r["leaves"]))
        for leaf in r["leaves"]:
            metrics = [m["metric"] for m in leaf["metric_list"]]
            assert spec.metric in metrics, (leaf["task"], metrics)
            if spec.filter != "none":
                assert spec.filter in [f["name"] for f in leaf["filter_list"]], leaf["task"]
            expected_type = "generate_until" if spec.name == "gsm8k" else "multiple_choice"
            assert leaf["output_type"] == expected_type, leaf["task"]
    assert kinds["mmlu"] == ("group", 57)  # the 57 subjects the leaderboard averaged
    assert all(kinds[n] == ("task", 1) for n in kinds if n != "mmlu")
    # TruthfulQA's leaderboard score is mc2, which lm_eval reports as truthfulqa_mc2's `acc`
    mc2 = resolve(registry, FOX1_SUITE[2])["leaves"][0]
    assert mc2["task"] == "truthfulqa_mc2" and "process_results_mc2" in str(mc2["process_results"])


def test_task_list_syntax():
    specs = parse_task_list(["arc_challenge:25", "gsm8k", "my_task:0"])
    assert [(s.name, s.shots) for s in specs] == [("arc_challenge", 25), ("gsm8k", None), ("my_task", 0)]
    assert specs[1].metric == "exact_match" and specs[1].filter == "strict-match"  # a suite task keeps its metric
    with pytest.raises(ConfigError, match="arc:x"):
        parse_task_list(["arc:x"])
    with pytest.raises(ConfigError, match="twice"):
        parse_task_list(["gsm8k:5", "gsm8k:8"])
    with pytest.raises(ConfigError, match="unknown suite"):
        suite("fox2")


def test_eval_config_validation():
    from megafox.config import EvalConfig

    assert EvalConfig().validate().interval == 0
    for bad, field in [(dict(interval=-1), "eval.interval"), (dict(interval=10), "eval.tasks"),
                       (dict(limit=0), "eval.limit"), (dict(batch_size=0), "eval.batch_size"),
                       (dict(interval="5"), "eval.interval")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            EvalConfig(**bad).validate()
    # the task list's syntax is checked when the trainer builds the evaluator, at start-up
    from megafox.training.callbacks.downstream_eval import DownstreamEvalCallback

    with pytest.raises(ConfigError, match=r"eval\.tasks"):
        DownstreamEvalCallback(EvalConfig(interval=5, tasks=["hellaswag:x"]))


def _fake_hf_dir(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")  # the data check runs before the model is read
    return hf


def test_missing_staged_dataset_exits_2_naming_task_and_path(tmp_path):
    data = tmp_path / "data"
    stage_arc(data)  # the first suite task is staged; the second is not
    out = tmp_path / "out"
    proc = run_eval("--hf", _fake_hf_dir(tmp_path), "--suite", "fox1", "--data-dir", data, "--output", out)
    line = assert_one_line_error(proc)
    assert "hellaswag" in line and str(data / "Rowan" / "hellaswag") in line, line
    assert "hf download Rowan/hellaswag --repo-type dataset" in line
    assert not out.exists()  # nothing written, nothing evaluated


@pytest.mark.slow
def test_dataset_not_in_cache_fails_fast_offline(tmp_path):
    """No --data-dir and an empty HF cache: one line naming the task, at once (no network wait)."""
    cache = tmp_path / "hf_home"
    start = time.monotonic()
    proc = run_eval("--hf", _fake_hf_dir(tmp_path), "--tasks", "winogrande:5", "--output", tmp_path / "out",
                    extra_env={"HF_HOME": str(cache), "HF_DATASETS_CACHE": str(cache / "datasets")})
    line = assert_one_line_error(proc)
    assert "task winogrande" in line and "could not load its data" in line, line
    assert time.monotonic() - start < 120


def test_unknown_task_is_named(registry):
    from megafox.eval.suites import TaskSpec
    from megafox.eval.tasks import resolve

    with pytest.raises(ConfigError, match="'hellaswagg': not in lm_eval's task registry; similar: .*hellaswag"):
        resolve(registry, TaskSpec("hellaswagg"))


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tmp_path):
    hf = _fake_hf_dir(tmp_path)
    line = assert_one_line_error(run_eval("--hf", hf, "--tasks", "gsm8k:five", "--output", tmp_path / "o"))
    assert "gsm8k:five" in line
    line = assert_one_line_error(run_eval("--hf", tmp_path / "nope", "--tasks", "gsm8k", "--output", tmp_path / "o"))
    assert "nope" in line
    line = assert_one_line_error(run_eval("--checkpoint", tmp_path / "nope", "--tasks", "gsm8k",
                                          "--output", tmp_path / "o"))
    assert "nope" in line
