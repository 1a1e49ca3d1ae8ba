"""Bad chat records are counted by reason with their file:line, never fatal; bad templates and plans
exit 2 with one line naming the field."""
import collections
import json
import os

import pytest

from data_prep import sft_offline_chat as chat
from tests.data_prep.dp_sft_helpers import sft
from tests.support.processes import REPO, run_module


def test_every_bad_record_counted_with_its_line(tmp_path, tokenizer):
    files = chat.write_all(str(tmp_path / "raw"))
    r = sft("--input", *files, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "out" / "chat",
            "--chat-template", "fox1", "--seq-length", 512, "--workers", 2, "--progress", "none")
    assert r.returncode == 0 and "dropped" in r.stdout
    man = json.loads((tmp_path / "out" / "chat.manifest.json").read_text())
    expected = collections.Counter(reason for reason, _ in chat.bad_records())
    expected["overlong"] += 1  # long_records(): a first answer longer than 512 tokens alone
    assert man["dropped"] == dict(expected)
    c = man["conversations"]
    assert c["read"] == c["written"] + c["dropped"] and c["dropped"] == sum(expected.values())
    assert man["truncated"] == {"overlong": c["truncated"]} and c["truncated"] >= 2
    # each reject names the file and line holding that record
    lines = open(files[0], "rb").read().split(b"\n")
    bad_lines = {line: reason for reason, line in chat.bad_records()}
    rejects = [json.loads(x) for x in open(tmp_path / "out" / "chat.rejects.jsonl")]
    dropped = [x for x in rejects if x["action"] == "dropped"]
    assert len(dropped) == c["dropped"] and sum(x["action"] == "truncated" for x in rejects) == c["truncated"]
    for x in dropped:
        assert x["file"] == files[0]
        raw = lines[x["line"] - 1]
        if x["reason"] == "overlong":
            assert "relatives in full" in raw.decode()
        else:
            assert bad_lines[raw] == x["reason"], (x, raw)
    # the manifest keeps samples of each reason, with the same file:line
    assert {(e["reason"], e["line"]) for e in man["examples"]} <= {(x["reason"], x["line"]) for x in rejects}
    assert {e["reason"] for e in man["examples"]} == set(man["dropped"]) | set(man["truncated"])
    # conversations written: every good record (chat.jsonl, parquet, sharegpt, alpaca) but the dropped
    good = len(chat.chat_records()) + len(chat.long_records()) + len(chat.sharegpt_records()) + \
        len(chat.alpaca_records())
    assert c["written"] == good - 1 and man["documents"] == c["written"]
    assert man["record_forms"]["alpaca"] == len(chat.alpaca_records()) + 2  # two bad alpaca records


def test_overlong_drop_policy(tmp_path, tokenizer):
    files = chat.write_all(str(tmp_path / "raw"), bad=False)
    out = tmp_path / "d"
    sft("--input", *files, "--tokenizer", tokenizer, "--output-prefix", out, "--chat-template", "fox1",
        "--seq-length", 300, "--overlong", "drop", "--workers", 1, "--progress", "none")
    man = json.loads(open(str(out) + ".manifest.json").read())
    assert man["truncated"] == {} and man["dropped"]["overlong"] > 3
    assert man["dropped"] == {"overlong": man["dropped"]["overlong"]}
    from megafox.formats.indexed import read_idx

    _, lengths, _ = read_idx(str(out) + ".idx")
    assert lengths.max() <= 300 and len(lengths) == man["documents"]


def _plan(tmp_path, tokenizer, **stage):
    import yaml

    raw = tmp_path / "raw"
    if not raw.exists():
        chat.write_all(str(raw))
    plan = {"output_dir": str(tmp_path / "data"), "tokenizer": {"model": str(tokenizer)},
            "preprocess": {"workers": 1},
            "stages": {"sft": dict({"kind": "sft", "chat_template": "fox1", "seq_length": 512, "token_budget": 1000,
                                    "sources": [{"name": "chat", "globs": [str(raw / "chat.jsonl")],
                                                 "weight": 1.0}]}, **stage)}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.mark.parametrize("stage, msg", [
    ({"chat_template": "missing_template.jinja"},
     "stages.sft.chat_template: 'missing_template.jinja' is neither a built-in template (fox1) nor an existing file"),
    ({"chat_template": "chatml3"}, "stages.sft.chat_template: 'chatml3' is neither a built-in template"),
    ({"chat_template": None}, "stages.sft.chat_template: must be a built-in template name"),
    ({"seq_length": "long"}, "stages.sft.seq_length: required for kind: sft, an integer >= 2"),
    ({"overlong": "wrap"}, "stages.sft.overlong: must be truncate or drop"),
    ({"kind": "instruct"}, "stages.sft.kind: must be pretrain (documents) or sft"),
    ({"kind": "pretrain"}, "stages.sft.chat_template: only for kind: sft stages"),
])
def test_plan_errors_exit_2(tmp_path, tokenizer, capsys, stage, msg):
    from data_prep.plan import main

    path = _plan(tmp_path, tokenizer, **stage)
    for extra in (["--validate"], []):
        assert main(["--plan", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and msg in err, err
    assert not (tmp_path / "data" / "sft").exists()


def test_plan_missing_template_exits_2(tmp_path, tokenizer):
    """As a user runs it: one line naming the plan and the field, exit status 2, nothing written."""
    path = _plan(tmp_path, tokenizer, chat_template="templates/fox1_v2.jinja")
    r = run_module("data_prep.plan", "--plan", path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {path}: stages.sft.chat_template: 'templates/fox1_v2.jinja'"), r.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("text, msg", [
    ("{% for m in messages %}{{ m['content'] }", "not a valid Jinja template (line 1"),
    # ignores add_generation_prompt: the assistant header would be trained
    ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}",
     "does not start with its content"),
    # drops earlier assistant turns when rendering a longer conversation: no stable prefix
    ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] + ': ' + m['content'] }}"
     "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
     "cannot render a user/assistant conversation"),
])
def test_unusable_template_files_exit_2(tmp_path, tokenizer, capsys, text, msg):
    from data_prep import plan, sft

    tpl = tmp_path / "t.jinja"
    tpl.write_text(text)
    path = _plan(tmp_path, tokenizer, chat_template=str(tpl))
    assert plan.main(["--plan", str(path), "--validate"]) == 2
    err = capsys.readouterr().err
    assert msg in err and f"stages.sft.chat_template: {tpl}" in err, err
    # the standalone tool says the same
    assert sft.main(["--input", str(tmp_path / "raw" / "chat.jsonl"), "--tokenizer", str(tokenizer),
                     "--output-prefix", str(tmp_path / "o"), "--chat-template", str(tpl), "--seq-length", "64"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err


def test_cli_bad_input_exit_2(tmp_path, tokenizer, capsys):
    from data_prep.sft import main

    (tmp_path / "doc.txt").write_text("plain text")
    cases = [
        (["--input", tmp_path / "none.jsonl"], "none.jsonl: no such file"),
        (["--input", tmp_path / "doc.txt"], "chat data must be JSONL"),
        (["--input", os.path.join(REPO, "README.md"), "--chat-template", "nope"], "--chat-template: 'nope'"),
    ]
    for args, msg in cases:
        full = ["--tokenizer", tokenizer, "--output-prefix", tmp_path / "o", "--chat-template", "fox1",
                "--seq-length", 64, *args]
        assert main([str(a) for a in full]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert main(["--input", str(tmp_path / "doc.txt"), "--tokenizer", str(tokenizer), "--output-prefix",
                 str(tmp_path / "o")]) == 2
    assert "--chat-template is required" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.bin")


@pytest.mark.parametrize("name", ["fox1_sft.yaml", "tiny_sft.yaml"])
def test_shipped_sft_plans_validate(name, capsys):
    from data_prep.plan import load_plan, main

    path = os.path.join(REPO, "configs", "data", name)
    assert main(["--plan", path, "--validate"]) == 0 and "ok (1 stages" in capsys.readouterr().out
    st = load_plan(path)["stages"]["sft"]
    assert st["kind"] == "sft" and st["sft"]["chat_template"].name == "fox1"
    assert st["sft"]["seq_length"] == (8192 if name == "fox1_sft.yaml" else 512)
