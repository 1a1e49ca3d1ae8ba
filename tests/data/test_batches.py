"""A stage's `Batches` chosen by its kind (`megafox.data.kinds.open_stage_batches`): pretraining
stages read the earlier stages' documents from the previous stage's record and ask for the earlier
stages' specs only without one; SFT stages get packed batches whose length sets the stage's; each
kind's stage-end record is what later stages need (the documents a pretraining stage read,
equal to megatron's own sample index; nothing for SFT)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from megafox.config import ConfigError, load_train_config
from megafox.data.build_index import cache_dir
from megafox.data.documents_read import read_documents_read, record_dir
from megafox.data.kinds import open_stage_batches
from megafox.data.sft_data import SFTData
from megafox.data.stage_data import StageData
from tests.data.data_helpers import gather, reference_documents_read
from tests.support.indexed import synthetic_conversations, write_blend, write_sft_blend, write_sft_dataset
from tests.support.processes import REPO

USED1 = 64  # stage 1 samples consumed before stage 2


def _same_sets(got, want):
    assert set(got) == set(want)
    for prefix in want:
        assert np.array_equal(np.asarray(got[prefix]), want[prefix]), prefix


def test_pretraining_stage_reads_the_record_and_asks_for_earlier_specs_only_without_one(corpus_data, tok_model,
                                                                                        tmp_path):
    data = tmp_path / "data"
    code, prose = corpus_data["code"], corpus_data["prose"]
    write_blend(data / "stage1" / "blend.json", tok_model, [(code, 0.8), (prose, 0.2)], 4096, "stage1")
    write_blend(data / "stage2" / "blend.json", tok_model, [(code, 0.5), (prose, 0.5)], 4096, "stage2")
    cfg = load_train_config(str(REPO / "configs" / "train" / "tiny.yaml"),
                            [f"data_dir={data}", f"checkpoint.dir={tmp_path / 'ckpt'}",
                             "stages.stage1.token_budget=8192", "stages.stage2.token_budget=4096"])
    logs = []
    s1 = open_stage_batches(cfg, cfg.stage("stage1"), 0, logs.append, previous_stages=lambda: [])
    assert isinstance(s1, StageData) and s1.pipeline_shape(2) == (64, 2)

    name = s1.record_reads(cfg.checkpoint.dir, "stage1", USED1)
    assert name == "stage1.documents" == record_dir(cfg.checkpoint.dir, "stage1").name
    expected = reference_documents_read(s1.train_dataset, USED1)
    _same_sets(read_documents_read(record_dir(cfg.checkpoint.dir, "stage1")), expected)

    asked = []
    spec = {"blend": str(data / "stage1" / "blend.json"), "seq_length": 64, "token_budget": 8192,
            "consumed_samples": USED1}
    s2 = open_stage_batches(cfg, cfg.stage("stage2"), 1, logs.append,
                            previous_stages=lambda: asked.append(1) or [spec])
    assert asked == [] and "leaving out the documents of stage1" in logs[-1]
    _same_sets(s2.excluded_documents, expected)

    # a stage 1 that finished before records existed: the specs are asked for once, and the record
    # is written for the requeues
    shutil.rmtree(record_dir(cfg.checkpoint.dir, "stage1"))
    again = open_stage_batches(cfg, cfg.stage("stage2"), 1, logs.append,
                               previous_stages=lambda: asked.append(1) or [spec])
    assert asked == [1]
    _same_sets(again.excluded_documents, expected)
    _same_sets(read_documents_read(record_dir(cfg.checkpoint.dir, "stage1")), expected)
    assert torch.equal(gather(again, 0, again.num_samples)["tokens"], gather(s2, 0, s2.num_samples)["tokens"])


def test_sft_stage_gets_packed_batches_that_set_its_length_and_no_record(tok_model, tmp_path):
    convs, masks = synthetic_conversations(60, 4, 100, 1000, seed=3)
    prefix = write_sft_dataset(str(tmp_path / "data" / "sft" / "chat"), convs, masks)
    write_sft_blend(str(tmp_path / "data" / "sft" / "blend.json"), tok_model, [(prefix, 1.0)], 128)
    overrides = [f"data_dir={tmp_path / 'data'}", f"checkpoint.dir={tmp_path / 'ckpt'}", "model.vocab_size=1000",
                 "stages.sft.seq_length=128", "stages.sft.batch_tokens=512", "stages.sft.epochs=2",
                 "schedule.warmup_tokens=0"]
    config = str(REPO / "configs" / "train" / "tiny_sft.yaml")

    local = load_train_config(config, overrides + ["model.transformer_impl=local"])
    with pytest.raises(ConfigError, match="cannot keep packed conversations apart"):
        open_stage_batches(local, local.stage("sft"), 0, print, previous_stages=lambda: pytest.fail("asked"))

    cfg = load_train_config(config, overrides)
    logs = []
    data = open_stage_batches(cfg, cfg.stage("sft"), 0, logs.append, previous_stages=lambda: pytest.fail("asked"))
    assert isinstance(data, SFTData) and data.global_batch_size == 4 and data.cache_dir == cache_dir(cfg)
    stage = cfg.stage("sft")
    assert stage.token_budget == data.num_samples * 128 and stage.num_steps == data.num_samples // 4
    assert f"{data.num_real_samples} packed rows of 128 tokens over 2 epoch(s)" in logs[-1]
    # packed rows run as one sequence of micro_batch_size x seq_length tokens
    assert data.pipeline_shape(2) == (256, 1)
    batch = next(data.micro_batches(0, 2, 0, 1))
    assert batch["tokens"].shape == (2, 128) and int(batch["cu_seqlens"][-1]) == 256
    assert data.record_reads(cfg.checkpoint.dir, "sft", 4) is None
    assert not (tmp_path / "ckpt" / "sft.documents").exists()
