"""The real trainer equals transformers + torch.optim.AdamW + the LR schedule's closed form, every step.

megafox side: the user's path, nothing else. A transformers LlamaForCausalLM saved as an HF
directory -> `megafox-from-hf` -> `launch/local.sh stage1` (--load the conversion) -> `launch/
local.sh stage2` (continues from stage1's final checkpoint) -> `megafox-to-hf --dtype fp32`.
Every step's loss, lr and grad norm are read from metrics/<stage>.jsonl, the final weights from the
export.

Reference side, written here from the definitions: the same LlamaForCausalLM, the per-token mean
cross-entropy over the global batch, torch.nn.utils.clip_grad_norm_ (its returned pre-clip norm is
what megatron logs), torch.optim.AdamW with weight decay on the matrices only (megatron-core's
default param groups give every 1-D parameter, the RMSNorm weights, wd_mult 0), and the lr of each
step from the schedule's closed form in tokens (below). Its batches are read independently of the
trainer's data code: megatron-core's own GPTDataset over each stage's indexed file (one prefix per
stage, nothing held out, so neither the held-out split nor the "no document twice" rule of
megafox.data decides anything), global batch k = samples [k*B, (k+1)*B) (Megatron's pretraining
sampler order, which megafox documents as its contract).

The vocabulary is a SentencePiece of 512 pieces: a multiple of 128 x TP for TP <= 4, so megafox's
embedding has no padding rows and the softmax the trainer takes is exactly the HF model's whatever
megafox does with padded rows (tests/independent/test_independent_step_vs_hf.py owns that).

Layouts x schedules: 1 rank and PP2 with warmup+cosine, TP2 and DP2 (the distributed optimizer's
sharded update) with WSD: every layout once and each schedule across the stage change (the
scheduler is the same per-rank code at every layout, so the full product would add runtime, not
coverage). bf16 runs once, at 1 rank, against the fp32 reference.
"""
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import LlamaConfig, LlamaForCausalLM

from tests.support.indexed import write_blend, write_indexed
from tests.support.processes import REPO, free_port, run_command, run_module
from tests.support.text import paragraphs, stdlib_texts
from tests.support.tokenizers import encode_documents, train_sentencepiece

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

VOCAB = 512
SEED = 1234
GLOBAL_BATCH = 4  # sequences
MICRO_BATCH = 2
STAGES = [  # name, seq_length, steps, corpus (one indexed file per stage)
    ("stage1", 32, 4, "json/*.py"),
    ("stage2", 64, 3, "http/*.py"),
]
TOTAL = sum(seq * GLOBAL_BATCH * steps for _, seq, steps, _ in STAGES)  # 512 + 768 = 1280 tokens
# Chosen so every part of the update matters (test_the_comparison_can_fail checks it): clipping
# active on every step, eps within an order of magnitude of the clipped grads (Adam is then not
# scale invariant, so clipping changes the step), betas that are not the defaults.
LR, MIN_LR, INIT_LR = 1e-2, 1e-3, 2e-3
OPTIMIZER = dict(lr=LR, min_lr=MIN_LR, beta1=0.8, beta2=0.9, eps=3e-4, weight_decay=0.1, clip_grad=0.5)
WARMUP = 256  # tokens: warmup ends after stage1's second step
WSD_DECAY = 896  # tokens: the decay starts at 384, mid stage1, and runs across the stage change
SCHEDULES = {
    "cosine": {"style": "cosine", "warmup_tokens": WARMUP, "init_lr": INIT_LR},
    "wsd": {"style": "wsd", "warmup_tokens": WARMUP, "init_lr": INIT_LR, "decay_tokens": WSD_DECAY,
            "wsd_decay_style": "linear"},
}
LAYOUTS = {"tp1": (1, []), "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
           "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]), "dp2": (2, [])}  # DP2: distributed optimizer
RUNS = [("tp1", "cosine"), ("tp2", "wsd"), ("pp2", "cosine"), ("dp2", "wsd")]

# fp32 tolerances. Both sides compute the same fp32 math in another order (megatron's fused QKV
# and SwiGLU GEMMs, TP-split GEMMs and reductions, per-micro-batch loss sums, a pipeline's
# stages): the loss, a mean of 128-256 per-token losses, then differs by a few fp32 ulps (2^-23 ~
# 1.2e-7 relative; observed <= 8e-8), the grad norm, a sum of ~1.6e5 squares in another order and
# partition, by some 10 ulps (observed <= 1.2e-6). The weights after 7 Adam steps: an update is
# lr * m / (sqrt(v) + eps), and eps = 3e-4 keeps it from amplifying the gradients' rounding where
# they are near 0, so the weights differ by rounding-level amounts (observed <= 2.5e-7). 2e-6 is
# 1/500 of the smallest lr: an lr 2% off, no clipping or decayed norms show by over 1000x more
# (test_the_comparison_can_fail).
LOSS_RTOL, GRAD_NORM_RTOL = 1e-6, 1e-5
WEIGHT_ATOL = 2e-6


# ---------------------------------------------------------------------------------------------
# the closed form of the schedule, in tokens consumed once the step's batch is trained

def closed_form_lr(style: str, t: int) -> float:
    """megafox documents (README, megafox/training/schedule.py): linear warmup from init_lr to lr
    over warmup_tokens; cosine: min + (max - min) * (1 + cos(pi * (t - W) / (T - W))) / 2; wsd: lr
    until T - D, then linear to min_lr over the last D tokens; T = the whole curriculum's tokens,
    the schedule never resets at a stage."""
    if t <= WARMUP:
        return INIT_LR + (LR - INIT_LR) * t / WARMUP
    if style == "cosine":
        return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (t - WARMUP) / (TOTAL - WARMUP)))
    start = TOTAL - WSD_DECAY
    if t <= start:
        return LR
    return MIN_LR + (LR - MIN_LR) * (1 - (t - start) / WSD_DECAY)


def step_tokens():
    """(stage, tokens consumed after each step of the curriculum)."""
    t, out = 0, []
    for name, seq, steps, _ in STAGES:
        for _ in range(steps):
            t += seq * GLOBAL_BATCH
            out.append((name, t))
    return out


# ---------------------------------------------------------------------------------------------
# the reference

def hf_model():
    """Fox-1's architecture at fox1-tiny's shape (tied embeddings, GQA 4:2), norms random so a
    swapped or undecayed/decayed norm shows."""
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False,
                         mlp_bias=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def reference_batches(data: Path, eos: int):
    """{stage: [global batch]} read by megatron-core's GPTDataset from the stage's indexed file
    (its own index build, in its own cache directory)."""
    tokenizer = SimpleNamespace(vocab_size=VOCAB, eod=eos, pad=-1, unique_identifiers={"reference": "sp512"})
    out = {}
    for name, seq, steps, _ in STAGES:
        # megafox's contract: a stage has ceil(token_budget / seq_length) samples (the count is
        # part of GPTDataset's shuffle), and its budget here is exactly its steps' tokens
        num_samples = math.ceil(seq * GLOBAL_BATCH * steps / seq)
        config = GPTDatasetConfig(random_seed=SEED, sequence_length=seq, blend=([str(data / "shards" / name)], None),
                                  split="1,0,0", tokenizer=tokenizer, reset_position_ids=False,
                                  reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
                                  path_to_cache=str(data / "reference_cache"))
        dataset = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()[0]
        samples = [dataset[i] for i in range(num_samples)]
        batches = [samples[k * GLOBAL_BATCH:(k + 1) * GLOBAL_BATCH] for k in range(steps)]
        out[name] = [{key: torch.stack([torch.as_tensor(s[key]) for s in batch])
                      for key in ("tokens", "labels", "loss_mask")} for batch in batches]
    return out


def hf_train(initial, batches, style: str, *, clip: bool = True, decay_1d: bool = False, lr_scale: float = 1.0):
    """One AdamW step per global batch over the curriculum; per step loss, lr, pre-clip grad norm;
    the final weights. The knobs make deliberately wrong variants for test_the_comparison_can_fail."""
    model = hf_model()
    model.load_state_dict(initial)
    model.train()
    named = dict(model.named_parameters())  # the tied lm_head appears once, as the embedding
    matrices = [p for p in named.values() if p.ndim >= 2]
    vectors = [p for n, p in named.items() if p.ndim < 2]
    assert all(n.endswith("norm.weight") for n, p in named.items() if p.ndim < 2)
    wd = OPTIMIZER["weight_decay"]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": wd},
                             {"params": vectors, "weight_decay": wd if decay_1d else 0.0}],
                            lr=LR, betas=(OPTIMIZER["beta1"], OPTIMIZER["beta2"]), eps=OPTIMIZER["eps"])
    steps = []
    schedule = iter(step_tokens())
    for name, _, _, _ in STAGES:
        for batch in batches[name]:
            stage, t = next(schedule)
            assert stage == name
            lr = closed_form_lr(style, t) * lr_scale
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad()
            logits = model(input_ids=batch["tokens"].long()).logits.float()
            token_loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].long().reshape(-1),
                                         reduction="none")
            mask = batch["loss_mask"].float().reshape(-1)
            loss = (token_loss * mask).sum() / mask.sum()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["clip_grad"] if clip else math.inf)
            opt.step()
            steps.append({"stage": name, "loss": loss.item(), "lr": lr, "grad_norm": norm.item()})
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return {"steps": steps, "weights": weights}


# ---------------------------------------------------------------------------------------------
# fixtures: data, the HF model and its conversion, the reference, the trainer's runs

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer_vs_hf")
    data = tmp / "data"
    corpora = {name: paragraphs(stdlib_texts([pattern]), loose=True) for name, _, _, pattern in STAGES}
    tokenizer = train_sentencepiece(data, [d for docs in corpora.values() for d in docs], VOCAB, byte_fallback=False,
                                    pad_id=-1, character_coverage=1.0, max_sentence_length=100000)
    eos = spm.SentencePieceProcessor(model_file=str(tokenizer)).eos_id()
    for name, seq, steps, _ in STAGES:
        prefix = write_indexed(data / "shards" / name, encode_documents(tokenizer, corpora[name]))
        write_blend(data / name / "blend.json", tokenizer, [(prefix, 1.0)], seq * GLOBAL_BATCH * steps, name,
                    counts=True)
    model = hf_model()
    model.save_pretrained(str(tmp / "hf"), safe_serialization=True)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    proc = run_module("checkpoints_tools.from_hf", "--hf", tmp / "hf", "--output", tmp / "converted", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"tmp": tmp, "data": data, "initial": initial, "batches": reference_batches(data, eos),
            "converted": tmp / "converted"}


@pytest.fixture(scope="module")
def references(setup):
    return {style: hf_train(setup["initial"], setup["batches"], style) for style in SCHEDULES}


def write_config(path: Path, data: Path, root: Path, style: str, precision: str) -> Path:
    config = {
        "model": {"preset": "fox1-tiny", "vocab_size": VOCAB, "max_position_embeddings": 1024},
        "parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                     "use_distributed_optimizer": True},
        "seed": SEED, "micro_batch_size": MICRO_BATCH, "data_dir": str(data), "nan_policy": "halt",
        "build": {"precision": precision},
        "optimizer": OPTIMIZER, "schedule": SCHEDULES[style],
        "stages": [{"name": name, "seq_length": seq, "token_budget": seq * GLOBAL_BATCH * steps,
                    "batch_tokens": seq * GLOBAL_BATCH, "data": f"{name}/blend.json"}
                   for name, seq, steps, _ in STAGES],
        "checkpoint": {"dir": str(root), "interval": 1000, "keep_last": 1},
        "logging": {"interval": 1},
        "validation": {"interval": 0, "valid_fraction": 0.0},
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def train(setup, layout: str, style: str, precision: str = "fp32"):
    """Both stages through launch/local.sh, then the fp32 export; (per-step metrics, final weights)."""
    run = setup["tmp"] / f"{layout}_{style}_{precision}"
    run.mkdir()
    root = run / "ckpt"
    config = write_config(run / "config.yaml", setup["data"], root, style, precision)
    nproc, overrides = LAYOUTS[layout]
    steps = []
    for i, (name, _, _, _) in enumerate(STAGES):
        env = dict(os.environ, MEGAFOX_CONFIG=str(config), MEGAFOX_NPROC=str(nproc), MEGAFOX_PYTHON=sys.executable,
                   MEGAFOX_MASTER_PORT=str(free_port()), MEGAFOX_OVERRIDES=" ".join(overrides),
                   MEGAFOX_TRAIN_ARGS=f"--load {setup['converted']}" if i == 0 else "", OMP_NUM_THREADS="1")
        proc = run_command(["bash", REPO / "launch" / "local.sh", name], env=env, timeout=300)
        assert proc.returncode == 0, f"{layout} {style} {name}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        records = [json.loads(line) for line in (root / "metrics" / f"{name}.jsonl").read_text().splitlines()]
        steps += [r for r in records if "loss" in r]
    proc = run_module("checkpoints_tools.to_hf", "--checkpoint", root, "--output", run / "export", "--dtype", "fp32",
                      "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    weights = {}
    for shard in sorted((run / "export").glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    return {"steps": steps, "weights": weights, "root": root}


@pytest.fixture(scope="module")
def runs(setup):
    return {(layout, style): train(setup, layout, style) for layout, style in RUNS}


# ---------------------------------------------------------------------------------------------
# the tests

def test_the_reference_reads_what_the_schedule_assumes(setup):
    """The reference's batches are the stages' shapes and hold real text (no padding, mask all 1)."""
    for name, seq, steps, _ in STAGES:
        batches = setup["batches"][name]
        assert len(batches) == steps
        for batch in batches:
            assert batch["tokens"].shape == batch["labels"].shape == (GLOBAL_BATCH, seq)
            assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
            assert bool((batch["loss_mask"] == 1).all())
            assert int(batch["tokens"].max()) < VOCAB and len(torch.unique(batch["tokens"])) > seq // 2


def test_the_comparison_can_fail(setup, references):
    """Each part of the update moves the weights by far more than WEIGHT_ATOL: clipping is active on
    every step, and dropping it, decaying the norms too, or an lr 2% off all show; the two
    schedules differ."""
    cosine = references["cosine"]
    assert all(s["grad_norm"] > 1.5 * OPTIMIZER["clip_grad"] for s in cosine["steps"])
    for variant in (dict(clip=False), dict(decay_1d=True), dict(lr_scale=1.02)):
        wrong = hf_train(setup["initial"], setup["batches"], "cosine", **variant)["weights"]
        diff = max((wrong[k] - cosine["weights"][k]).abs().max().item() for k in cosine["weights"])
        assert diff > 1000 * WEIGHT_ATOL, (variant, diff)
    for name, tensor in cosine["weights"].items():
        assert (tensor - setup["initial"][name]).abs().max() > 100 * WEIGHT_ATOL, f"{name} barely moved"
    lrs = {style: [s["lr"] for s in ref["steps"]] for style, ref in references.items()}
    assert lrs["cosine"] != lrs["wsd"]


@pytest.mark.parametrize("layout,style", RUNS, ids=[f"{a}-{b}" for a, b in RUNS])
def test_every_step_and_the_final_weights_equal_the_reference(runs, references, layout, style):
    got, ref = runs[(layout, style)], references[style]
    assert [(s["stage"], s["iteration"]) for s in got["steps"]] == [
        (r["stage"], i) for i, r in enumerate(ref["steps"], 1)]
    for g, r in zip(got["steps"], ref["steps"]):
        where = (layout, style, g["stage"], g["iteration"])
        # the scheduler computes the same closed form in float64: equal to rounding
        assert g["lr"] == pytest.approx(r["lr"], rel=1e-12), where
        assert g["loss"] == pytest.approx(r["loss"], rel=LOSS_RTOL), (where, g["loss"], r["loss"])
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=GRAD_NORM_RTOL), (where, g["grad_norm"],
                                                                                     r["grad_norm"])
    assert set(got["weights"]) - {"lm_head.weight"} == set(ref["weights"])
    for name, tensor in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=0, atol=WEIGHT_ATOL,
                                   msg=lambda m: f"{layout} {style} {name}: {m}")


# ---------------------------------------------------------------------------------------------
# bf16: the GPU precision path (Float16Module, fp32 main params in the distributed optimizer), on CPU

U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits, round to nearest
# How far one step's update may move under bf16 compute, relative to the fp32 step. Every GEMM
# input and every activation handed between ops is rounded to bf16 (relative error <= U each,
# accumulation in fp32); a weight's gradient comes through about 6 roundings per layer (norm,
# QKV, attention, projection, SwiGLU in, out) over 4 layers, forward and back: about 48. Were
# they all to point the same way the gradient's relative error would reach 48U; independent
# roundings add in quadrature, sqrt(48) U ~ 7U. Adam divides by sqrt(v) of the same gradients, so
# a gradient's relative error reaches the update about 1:1 (more only where |g| is near 0, which
# eps = 3e-4 caps, and those elements carry little of the update's norm). RHO = 16U allows
# 2.3x the quadrature estimate (observed on CPU: <= 6U for grad norms and per-tensor updates).
RHO = 16 * U  # 0.0625


def main_params_of_norms(root: Path):
    """The fp32 main params of the RMSNorm weights in the run's last checkpoint, HF-named. Read
    here because the export holds bf16(m): at |w| ~ 1 bf16's spacing (2^-7) is coarser than these
    weights' whole update over the run, so only the fp32 main params show it. (The norms are the
    only tensors whose megatron layout is HF's: no QKV interleave or fused gate/up to undo.)"""
    latest = int((root / "latest").read_text())
    dcp_to_torch_save(str(root / f"iter_{latest:07d}"), str(root.parent / "last.pt"))
    state = torch.load(root.parent / "last.pt", weights_only=False)
    main = "optimizer.state.param.decoder."
    qkv_norm = state[main + "layers.self_attention.linear_qkv.layer_norm_weight"]
    fc1_norm = state[main + "layers.mlp.linear_fc1.layer_norm_weight"]
    out = {"model.norm.weight": state[main + "final_layernorm.weight"]}
    for i in range(4):  # layers stacked on the first dimension
        out[f"model.layers.{i}.input_layernorm.weight"] = qkv_norm[i]
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = fc1_norm[i]
    return out


@pytest.fixture(scope="module")
def bf16_run(setup):
    return train(setup, "tp1", "cosine", precision="bf16")


def test_bf16_updates_follow_the_fp32_reference_within_bf16_precision(setup, references, bf16_run):
    """Per tensor, against the fp32 reference (r its final weights, w0 the initial ones). The bf16
    run starts from bf16(w0) (the conversion loaded into bf16 parameters; the optimizer's fp32
    main params are copied from them) and its export holds x = bf16(m), m the fp32 main params:
        x - bf16(w0) - (r - w0) = (bf16(m) - m) + (update_bf16 - update_ref)
    |bf16(m) - m| <= U |x| elementwise (round to nearest; relative to the rounded value too) and
    the update differs by at most RHO of the reference's update, so in the L2 norm
        matrices (the export):         || x - bf16(w0) - (r - w0) || <= U ||x|| + RHO ||r - w0||
        norms (fp32 main params m):    || m - bf16(w0) - (r - w0) || <= RHO ||r - w0||
    and each step's grad norm is within RHO of the reference's. Every tensor's update is more than
    twice its bound, so a run that lost its updates (left at bf16(w0)) fails, as does one whose
    updates are off by more than RHO."""
    ref, initial, got = references["cosine"], setup["initial"], bf16_run
    for g, r in zip(got["steps"], ref["steps"]):
        assert g["lr"] == pytest.approx(r["lr"], rel=1e-12)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=RHO), (g["iteration"], g["grad_norm"],
                                                                          r["grad_norm"])
    assert any(g["loss"] != r["loss"] for g, r in zip(got["steps"], ref["steps"]))  # really bf16
    norms = main_params_of_norms(got["root"])
    assert set(norms) == {k for k in ref["weights"] if k.endswith("norm.weight")}
    for name, r in ref["weights"].items():
        w0 = initial[name]
        update_ref = r - w0
        if name in norms:
            x, rounding = norms[name], 0.0
        else:
            x = got["weights"][name].float()
            assert torch.equal(x, x.bfloat16().float()), f"{name}: the export of a bf16 run holds bf16 values"
            rounding = U * x.norm().item()
        error = (x - w0.bfloat16().float() - update_ref).norm().item()
        bound = rounding + RHO * update_ref.norm().item()
        assert error <= bound, (name, error, bound)
        assert update_ref.norm().item() > 2 * bound, f"{name}: a lost update would pass"
