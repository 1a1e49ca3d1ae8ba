"""The data plan as a typed schema (megafox.config.data_plan), read by the same loader as the
training config; data_prep.plan.load_plan's mapping is built from it."""
import os

import pytest

from data_prep.plan import PlanError, load_plan
from megafox.config import ConfigError, read_plan
from tests.support.processes import assert_one_line_error, run_module

PLAN = """\
output_dir: out
tokenizer: {model: tok/sp.model}
preprocess: {workers: "4", shards: 2, chunk_mb: "0.5"}
stages:
  s1:
    token_budget: "2e9"
    sources:
      - {name: web, globs: "${PLAN_ROOT}/web/*.jsonl", weight: "0.7"}
      - {name: code, globs: ["~/code/*.jsonl", "$PLAN_UNSET_VAR/x"], weight: 3, format: jsonl, json_key: body}
"""


def test_typed_plan_numbers_variables_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAN_ROOT", "/data/root")
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.delenv("PLAN_UNSET_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.yaml").write_text(PLAN)
    plan = read_plan("plan.yaml")
    # relative paths: against the current directory; globs kept relative to nothing, variables expanded
    assert plan.path == str(tmp_path / "plan.yaml") and plan.output_dir == str(tmp_path / "out")
    assert plan.tokenizer.model == str(tmp_path / "tok" / "sp.model") and plan.tokenizer.train is None
    assert (plan.preprocess.workers, plan.preprocess.shards, plan.preprocess.chunk_mb) == (4, 2, 0.5)
    stage = plan.stages["s1"]
    assert stage.token_budget == 2_000_000_000 and type(stage.token_budget) is int and stage.kind == "pretrain"
    web, code = stage.sources
    assert web.globs == ["/data/root/web/*.jsonl"] and web.weight == 0.7 and web.format == "auto"
    assert code.globs == ["/home/u/code/*.jsonl", "$PLAN_UNSET_VAR/x"] and code.weight == 3
    assert (code.format, code.json_key, code.where) == ("jsonl", "body", "plan.yaml: stages.s1.sources[1]")
    # data_prep's mapping is this plan plus the sections data_prep checks itself (off here)
    mapping = load_plan("plan.yaml")
    assert mapping == {**plan.as_dict(), "stages": {"s1": {**plan.as_dict()["stages"]["s1"],
                                                             "dedup": None, "decontaminate": None}}}
    assert mapping["stages"]["s1"]["sources"][0] == {"name": "web", "globs": ["/data/root/web/*.jsonl"], "weight": 0.7,
                                                     "json_key": "text", "format": "auto",
                                                     "where": "plan.yaml: stages.s1.sources[0]"}


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('workers: "4"', "workers: -2"), "plan.yaml: preprocess.workers: must be > 0, got -2"),
    (lambda t: t.replace('token_budget: "2e9"', "token_budget: 1.5"),
     "plan.yaml: stages.s1.token_budget: must be a whole number, got 1.5"),
    (lambda t: t.replace("format: jsonl", "format: csv"),
     "plan.yaml: stages.s1.sources[1].format: must be one of auto, jsonl, parquet, text"),
    (lambda t: t.replace("shards: 2", "shard: 2"),
     "plan.yaml: preprocess: unknown field(s) shard (allowed: workers, append_eod, dtype, shards, chunk_mb)"),
    (lambda t: t.replace(', weight: "0.7"', ""), "plan.yaml: stages.s1.sources[0].weight: required"),
    (lambda t: t + "bogus: 1\n",
     "plan.yaml: unknown field(s) bogus (allowed: output_dir, tokenizer, preprocess, stages, name, description)"),
    (lambda t: "stages: [\n", "plan.yaml: not valid YAML (while parsing a flow node)"),
])
def test_plan_errors_keep_their_wording(tmp_path, monkeypatch, edit, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.yaml").write_text(edit(PLAN))
    with pytest.raises(ConfigError) as typed:
        read_plan("plan.yaml")
    with pytest.raises(PlanError) as mapped:
        load_plan("plan.yaml")
    assert str(typed.value) == str(mapped.value) == message


def test_plan_error_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "plan.yaml").write_text(PLAN.replace("shards: 2", "shards: two"))
    r = run_module("data_prep.plan", "--plan", tmp_path / "plan.yaml", "--validate")
    assert_one_line_error(r, f"{tmp_path / 'plan.yaml'}: preprocess.shards: must be a number, got 'two'")
    assert not os.path.exists(tmp_path / "out")
