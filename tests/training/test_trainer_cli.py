"""The real trainer CLI end to end: launch/local.sh -> torchrun (2 CPU ranks, gloo) -> megafox-train
on real indexed data through StageData. Resume, crashes, signals, layouts, stage change, NaN."""
import json
import math
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from megafox.checkpoint.layout import read_record, write_latest
from megafox.records import METADATA_FILE
from megafox.config import load_train_config
from tests.support.hf_reference import hf_llama
from tests.support.processes import REPO, run_module
from tests.training.harness import (adam_step, faulty_trainer, kill_session, latest, losses, metrics, model_tensors,
                                    run_stage, sample_ids, track, wait_for_line, worker_with_rank)

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

STAGE1_STEPS, GBS1 = 8, 8  # SMALL in harness.py: 4096 tokens / (8 x 64)
STAGE2_STEPS, GBS2 = 4, 8


def _ok(rc, out, expected=0):
    assert rc == expected, f"exit {rc}, expected {expected}:\n{out[-6000:]}"


def _assert_samples_exact(root, stage, steps, gbs, first_iteration=1):
    """Over all runs of the stage (a re-run step replaces the killed run's), the global batches
    are exactly stage samples [0, steps x gbs) in order: none repeated, none skipped."""
    ids = sample_ids(root, stage)
    assert sorted(ids) == list(range(first_iteration, first_iteration + steps))
    for it, batch in ids.items():
        k = it - first_iteration
        assert sorted(batch) == list(range(k * gbs, (k + 1) * gbs)), it


def test_crash_in_save_then_kill9_then_resume_is_bit_exact(reference, tiny_data, tmp_path):
    root = tmp_path / "ckpt"
    interval = ["checkpoint.interval=2"]
    # 1. every rank dies inside the 2nd save (iteration 4), after its shards, before megafox.json
    rc, out = run_stage("stage1", root, tiny_data, overrides=interval, env=faulty_trainer("--crash-in-save", "2"))
    assert rc != 0 and "crashing in save #2" in out, out[-4000:]
    assert latest(root) == 2
    assert (root / "iter_0000004").is_dir() and not (root / "iter_0000004" / METADATA_FILE).exists()
    assert read_record(root).iteration == 2
    # 2. the restart resumes from 2, saves 4 and 6, and is killed -9 at the start of step 7
    rc, out = run_stage("stage1", root, tiny_data, overrides=interval, env=faulty_trainer("--kill-at-step", "7"))
    assert rc != 0, out[-4000:]
    assert "resumed from" in out and "iter_0000002" in out
    assert latest(root) == 6
    # 3. the final restart finishes; every step's loss equals the uninterrupted run's, bit for bit
    rc, out = run_stage("stage1", root, tiny_data, overrides=interval)
    _ok(rc, out)
    assert "iter_0000006" in out and f"stage stage1 complete: iteration={STAGE1_STEPS}" in out
    assert losses(root, "stage1") == losses(reference, "stage1")
    _assert_samples_exact(root, "stage1", STAGE1_STEPS, GBS1)


def test_sigusr1_on_one_rank_saves_exits_75_and_resume_matches(reference, tiny_data, tmp_path):
    root = tmp_path / "ckpt"
    proc = run_stage("stage1", root, tiny_data, popen=True, env=faulty_trainer("--step-sleep", "0.4"))
    sessions = set()
    try:
        wait_for_line(proc, "step 2 ")
        track(proc, sessions)
        worker_with_rank(proc.pid, 1).send_signal(signal.SIGUSR1)  # rank 0 must learn it from the all-reduce
        out, _ = proc.communicate(timeout=240)
    finally:
        kill_session(proc, sessions)
    assert proc.returncode == 75, out[-4000:]
    assert "stopping: signal received on another rank" in out and "exit 75" in out  # rank 0 was not signalled
    stopped_at = latest(root)
    assert 2 <= stopped_at < STAGE1_STEPS
    assert not (root / "stage1.done").exists()
    rc, out = run_stage("stage1", root, tiny_data)
    _ok(rc, out)
    assert f"resumed from {root / f'iter_{stopped_at:07d}'}" in out
    ref = losses(reference, "stage1")
    assert losses(root, "stage1")[STAGE1_STEPS] == ref[STAGE1_STEPS]
    assert json.loads((root / "stage1.done").read_text())["loss"] == ref[STAGE1_STEPS]
    _assert_samples_exact(root, "stage1", STAGE1_STEPS, GBS1)


def test_exit_after_minutes_saves_and_exits_75(tiny_data, tmp_path):
    root = tmp_path / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, nproc=1, env={"MEGAFOX_TRAIN_ARGS": "--exit-after-minutes 0.0001"})
    assert rc == 75, out[-4000:]
    assert "--exit-after-minutes reached" in out
    assert latest(root) == 1 and read_record(root).run_state.consumed_samples == {"stage1": GBS1}


@pytest.mark.parametrize("name,source", [
    ("tp2_to_tp1", ["parallel.tensor_model_parallel_size=2"]),
    ("pp2_to_pp1", ["parallel.pipeline_model_parallel_size=2"]),
    ("pp2_vpp2_to_pp1", ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"]),
    # several padded DDP buckets per stage (the tied embedding's own bucket, 20K-parameter buckets)
    ("pp2_overlap_buckets_to_pp1", ["parallel.pipeline_model_parallel_size=2", "parallel.overlap_grad_reduce=true",
                                    "parallel.ddp_bucket_size=20000"]),
])
def test_resume_on_another_layout_continues_the_same_run(tiny_data, tmp_path, name, source):
    """Saved at TP2 (or PP2, or PP2 with 2 interleaved virtual stages) x DP1, resumed at TP1 x PP1 x DP2: model, distributed-optimizer state,
    schedule and data position all carry over, so the losses follow the uninterrupted run."""
    short = ["stages.stage1.token_budget=2048", "checkpoint.interval=2"]  # 4 steps, saved at 2
    src = tmp_path / "src"
    rc, out = run_stage("stage1", src, tiny_data, overrides=source + short)
    _ok(rc, out)
    straight = losses(src, "stage1")
    dst = tmp_path / "dst"
    dst.mkdir()
    shutil.copytree(src / "iter_0000002", dst / "iter_0000002")
    write_latest(dst, 2)
    rc, out = run_stage("stage1", dst, tiny_data, overrides=short)
    _ok(rc, out)
    assert "layout changed" in out and "RNG states not restored" in out
    resumed = losses(dst, "stage1")
    assert sorted(resumed) == [3, 4]
    for it in (3, 4):
        assert resumed[it] == pytest.approx(straight[it], rel=2e-6, abs=0), (it, resumed[it], straight[it])
    assert adam_step(dst / "iter_0000004") == 4.0


def test_stage_transition_keeps_optimizer_and_schedule_and_reads_no_sample_twice(reference, tiny_data, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(reference, root)
    rc, out = run_stage("stage2", root, tiny_data)
    _ok(rc, out)
    # starts from stage1's final checkpoint with its optimizer (Adam step 8) and token count
    assert f"resumed from {root / 'iter_0000008'}: iteration=8 stage=stage1 tokens=4096" in out
    # what stage1 read comes from its record, written once at its end, not recomputed (issue 18)
    assert "stage stage2: leaving out the documents of stage1 (" in out
    assert json.loads((root / "stage1.done").read_text())["documents"] == "stage1.documents"
    assert "optimizer_step=8" in out
    assert adam_step(root / "iter_0000012") == 12.0  # 8 + 4: continued, not restarted
    meta = read_record(root)
    assert meta.stage == "stage2" and meta.stage_end and meta.seq_length == 128
    assert meta.scheduler["num_steps"] == 4096 + 4096
    assert meta.run_state.consumed_samples == {"stage1": STAGE1_STEPS * GBS1, "stage2": STAGE2_STEPS * GBS2}
    # one cosine schedule over both stages: step 9's LR is the schedule at 5120 tokens, not a restart
    total, warmup, lr, min_lr = 4096 + 4096 + 16384, 1024, 3e-3, 3e-4

    def cosine(tokens):
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (tokens - warmup) / (total - warmup)))

    m2 = metrics(root, "stage2")
    assert sorted(m2) == [9, 10, 11, 12]
    assert m2[9]["lr"] == pytest.approx(cosine(5120), rel=1e-12)
    assert m2[9]["lr"] != pytest.approx(cosine(1024 + 1024), rel=1e-6)
    assert all(rec["loss_tokens"] == GBS2 * 128 for rec in m2.values())  # sequence length changed
    # data: stage2 sample ids are exactly its first 32; the documents they read (email is shared by
    # both blends) do not overlap what stage1's 64 samples read, and stage2 reads its new http data
    _assert_samples_exact(root, "stage2", STAGE2_STEPS, GBS2, first_iteration=STAGE1_STEPS + 1)
    from megafox.data.stage_data import StageData

    common = dict(seed=1234, cache_dir=str(root / "data_cache"), valid_fraction=0.05)
    s1 = StageData(str(tiny_data / "stage1" / "blend.json"), 64, GBS1, token_budget=4096, **common)
    s2 = StageData(str(tiny_data / "stage2" / "blend.json"), 128, GBS2, token_budget=4096, **common,
                   previous_stages=[{"blend": str(tiny_data / "stage1" / "blend.json"), "seq_length": 64,
                                     "consumed_samples": STAGE1_STEPS * GBS1, "token_budget": 4096}])
    read1 = s1.documents_read(STAGE1_STEPS * GBS1)
    read2 = s2.documents_read(STAGE2_STEPS * GBS2)
    email = str(tiny_data / "shards" / "email")
    assert len(read1[email]) > 0 and len(read2[email]) > 0
    assert set(read1[email].tolist()).isdisjoint(read2[email].tolist())
    assert len(read2[str(tiny_data / "shards" / "http")]) > 0


def test_stage_after_a_stage_without_documents_record_recomputes_once_and_trains_the_same(reference, tiny_data,
                                                                                          tmp_path):
    """A stage1 finished by megafox before documents records existed: stage2 recomputes what stage1
    read (the old path), records it for its requeues, and trains exactly what the record path trains."""
    with_record, without = tmp_path / "with_record", tmp_path / "without"
    shutil.copytree(reference, with_record)
    shutil.copytree(reference, without)
    shutil.rmtree(without / "stage1.documents")
    done = json.loads((without / "stage1.done").read_text())
    done.pop("documents")
    (without / "stage1.done").write_text(json.dumps(done))
    rc, out = run_stage("stage2", without, tiny_data)
    _ok(rc, out)
    assert "leaving out the documents of stage1" not in out  # recomputed, not read
    assert (without / "stage1.documents" / "documents.json").is_file()  # recorded for its requeues
    rc, out = run_stage("stage2", with_record, tiny_data)
    _ok(rc, out)
    assert "leaving out the documents of stage1" in out
    assert losses(without, "stage2") == losses(with_record, "stage2")
    assert sample_ids(without, "stage2") == sample_ids(with_record, "stage2")


def test_bf16_compiled_with_fused_loss_follows_fp32_and_resumes_bit_exact(reference, tiny_data, tmp_path):
    """The GPU precision path on CPU: Float16Module, fp32 main params in the distributed optimizer,
    the fused loss (torch.compile'd kernels) adding into fp32 main_grad from bf16 weights, compiled
    decoder layers, and a resume that reloads them."""
    bf16 = ["build.precision=bf16", "build.fused_loss=true", "build.loss_kernel=compiled", "build.compile_layers=true",
            "checkpoint.interval=2"]
    whole = tmp_path / "whole"
    rc, out = run_stage("stage1", whole, tiny_data, overrides=bf16)
    _ok(rc, out)
    got, ref = losses(whole, "stage1"), losses(reference, "stage1")
    assert sorted(got) == sorted(ref)
    assert got != ref  # really bf16
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=5e-3), (it, got[it], ref[it])
    root = tmp_path / "killed"
    rc, out = run_stage("stage1", root, tiny_data, overrides=bf16, env=faulty_trainer("--kill-at-step", "6"))
    assert rc != 0 and latest(root) == 4, out[-4000:]
    rc, out = run_stage("stage1", root, tiny_data, overrides=bf16)
    _ok(rc, out)
    assert "resumed from" in out and "iter_0000004" in out
    assert losses(root, "stage1") == got


def test_overlapped_grad_reduce_and_param_gather_train_and_resume_like_the_reference(reference, tiny_data, tmp_path):
    """DP2, distributed optimizer, several DDP buckets, gradient reduce-scatter during the backward
    and parameter all-gather during the next forward: the same losses as without overlap, and a
    checkpoint (saved with every rank's updated shard gathered) that resumes to them."""
    overlap = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
               "parallel.ddp_bucket_size=20000", "checkpoint.interval=2"]
    root = tmp_path / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, overrides=overlap, env=faulty_trainer("--kill-at-step", "6"))
    assert rc != 0 and latest(root) == 4, out[-4000:]
    rc, out = run_stage("stage1", root, tiny_data, overrides=overlap)
    _ok(rc, out)
    got, ref = losses(root, "stage1"), losses(reference, "stage1")
    assert sorted(got) == sorted(ref)
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-6), (it, got[it], ref[it])


def test_nan_skip_policy_skips_the_step_and_continues(tiny_data, tmp_path):
    root = tmp_path / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, nproc=1, overrides=["checkpoint.interval=1"],
                        env=faulty_trainer("--nan-at-step", "3"))
    _ok(rc, out)
    assert "skipped step 3: loss=nan" in out
    m = metrics(root, "stage1")
    assert m[3]["skipped"] and math.isnan(m[3]["loss"])
    assert not any(m[i]["skipped"] for i in m if i != 3) and sorted(m) == list(range(1, STAGE1_STEPS + 1))
    w2, w3, w4 = (model_tensors(root / f"iter_{i:07d}", tmp_path) for i in (2, 3, 4))
    assert set(w2) == set(w3) and len(w2) > 0
    assert all((w2[k] == w3[k]).all() for k in w2), "a skipped step changed the weights"
    assert any((w3[k] != w4[k]).any() for k in w3), "training did not continue after the skip"
    assert adam_step(root / "iter_0000003") == 2.0 and adam_step(root / "iter_0000004") == 3.0
    assert read_record(root).run_state.skipped_steps == 1


def test_nan_halt_policy_exits_3_with_a_message(tiny_data, tmp_path):
    root = tmp_path / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, nproc=1, overrides=["nan_policy=halt", "checkpoint.interval=2"],
                        env=faulty_trainer("--nan-at-step", "3"))
    assert rc == 3, out[-4000:]
    assert "halted: non-finite loss=nan" in out and "nan_policy is halt" in out
    assert "last checkpoint is iteration 2" in out
    assert latest(root) == 2 and not (root / "stage1.done").exists()


def test_virtual_stages_with_a_micro_batch_count_the_schedule_cannot_group_exit_2(tiny_data, tmp_path):
    rc, out = run_stage("stage1", tmp_path / "ckpt", tiny_data, overrides=[
        "parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
        "stages.stage1.batch_tokens=384"])  # 6 sequences of 64 in micro-batches of 2: 3, not a multiple of pp=2
    assert rc == 2, out[-4000:]
    # refused at start-up by the trainer, not by megatron-core's schedule in the first step
    assert "megafox-train: error: stages.stage1.batch_tokens: 3 micro-batches per step" in out
    assert "multiple of pipeline_model_parallel_size (2)" in out and "forward_backward" not in out


def test_load_hf_converted_weights_trains_and_exports_them_back(tiny_data, tmp_path):
    """Released weights -> megafox-from-hf -> megafox-train --load (at TP2) -> megafox-to-hf.
    With a vanishing learning rate the exported tensors are the released ones, bit for bit: the
    trainer started from exactly those weights (not from its own init) and saved them intact."""
    model = load_train_config(str(REPO / "configs" / "train" / "tiny.yaml")).model
    released = hf_llama(model, seed=5)
    released.save_pretrained(tmp_path / "released", safe_serialization=True)
    original = {k: v.clone() for k, v in released.state_dict().items()}

    def tool(module, *args):
        return run_module(f"checkpoints_tools.{module}", *args, timeout=300, check=True).stdout

    tool("from_hf", "--hf", tmp_path / "released", "--output", tmp_path / "base", "--tp", 1, "--pp", 1)
    root = tmp_path / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, overrides=[
        "parallel.tensor_model_parallel_size=2", "optimizer.lr=1e-30", "optimizer.min_lr=0",
        "stages.stage1.token_budget=1024"], env={"MEGAFOX_TRAIN_ARGS": f"--load {tmp_path / 'base'}"})
    _ok(rc, out)
    assert f"initialized weights from {tmp_path / 'base'}" in out
    assert "stage stage1 complete: iteration=2" in out and adam_step(root / "iter_0000002") == 2.0
    # inspect reads the trainer's own metadata: layout saved with, stage, consumed tokens/samples
    info = json.loads(tool("inspect", "--checkpoint", root, "--json"))
    assert info["layout"] == {"tp": 2, "pp": 1, "vpp": 1, "dp": 1, "world": 2}
    assert (info["iteration"], info["stage"], info["consumed_tokens"]) == (2, "stage1", 1024)
    assert info["consumed_samples"] == {"stage1": 16} and info["has_optimizer_state"]
    tool("to_hf", "--checkpoint", root, "--output", tmp_path / "export", "--dtype", "fp32")
    # no --tokenizer: the one the stage trained with, recorded in the checkpoint, is shipped
    shipped = (tmp_path / "export" / "tokenizer.model").read_bytes()
    assert shipped == (tiny_data / "tokenizer.model").read_bytes()
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(exported) <= set(original) and "model.layers.3.mlp.down_proj.weight" in exported
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name


def test_downstream_eval_in_the_trainer_scores_like_lm_eval_and_leaves_the_run_unchanged(reference, tiny_data,
                                                                                          tmp_path):
    """`eval:` in the training config: a local multiple-choice task every 4 steps on the DP2 model
    being trained. The losses equal the reference run's (the same run without it), each score is
    logged with its cost, and the score at the last step equals lm_eval's `hf` model on that
    step's checkpoint exported to HF."""
    from tests.eval.eval_helpers import run_eval, stage_docstring_task

    task_yaml = stage_docstring_task(tmp_path / "tasks", tmp_path / "task_data")
    root = tmp_path / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, overrides=[
        "eval.interval=4", f"eval.tasks=[{task_yaml}]", f"eval.data_dir={tmp_path / 'task_data'}", "eval.limit=12",
        "eval.batch_size=6"])
    _ok(rc, out)
    assert "downstream eval: docstring_mc every 4 steps (limit 12 documents per task)" in out
    assert losses(root, "stage1") == losses(reference, "stage1")  # bit-identical training
    records = [json.loads(line) for line in (root / "metrics" / "stage1.jsonl").read_text().splitlines()]
    scores = {r["iteration"]: r for r in records if any(k.startswith("eval/docstring_mc/") for k in r)}
    assert sorted(scores) == [4, 8], "\n".join(line for line in out.splitlines() if "eval" in line)
    key = next(k for k in scores[8] if k.startswith("eval/docstring_mc/"))
    assert all(0.0 <= s[key] <= 1.0 and s["eval/time_s"] > 0 for s in scores.values())
    assert f"step 8 stage=stage1 tokens={STAGE1_STEPS * GBS1 * 64} {key}=" in out

    run_module("checkpoints_tools.to_hf", "--checkpoint", root, "--output", tmp_path / "export", "--dtype", "fp32",
               timeout=300, check=True)
    proc = run_eval("--hf", tmp_path / "export", "--tasks", task_yaml, "--limit", 12, "--data-dir",
                    tmp_path / "task_data", "--output", tmp_path / "results", "--no-progress")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "export.json").read_text())
    theirs = next(r for r in report["tasks"] if r["task"] == "docstring_mc")
    assert key == f"eval/docstring_mc/{theirs['metric']}" and theirs["samples"] == 12
    assert scores[8][key] == pytest.approx(theirs["value"], abs=1e-9)
