"""Training config: the shipped recipes validate, bad values are reported by file and field, and
the CLI refuses bad configs and out-of-order stages with exit 2 before starting any process group."""
import pytest
import yaml

from megafox.checkpoint.layout import iteration_dir, list_checkpoints, rotate_checkpoints, write_latest
from megafox import records
from megafox.config import ConfigError, apply_overrides, fox1_tiny, load_train_config
from megafox.train import main
from tests.support.processes import REPO

TINY = REPO / "configs" / "train" / "tiny.yaml"
FOX1 = REPO / "configs" / "train" / "fox1_1p6b.yaml"


def test_fox1_recipe():
    cfg = load_train_config(FOX1)
    assert cfg.model.name == "fox1-1.6b" and cfg.model.num_layers == 32 and cfg.model.vocab_size == 256000
    assert [s.seq_length for s in cfg.stages] == [2048, 4096, 8192]
    assert sum(s.token_budget for s in cfg.stages) == 3 * 10**12
    assert all(s.batch_tokens == 4 * 2**20 for s in cfg.stages)
    assert (cfg.optimizer.beta2, cfg.optimizer.weight_decay, cfg.optimizer.clip_grad) == (0.95, 0.1, 1.0)
    assert cfg.schedule.style == "wsd" and cfg.schedule.decay_tokens == cfg.stages[-1].trained_tokens
    assert cfg.build.precision == "bf16" and cfg.logging.peak_flops == 989e12


def test_tiny_config():
    cfg = load_train_config(TINY)
    assert [s.seq_length for s in cfg.stages] == [64, 128, 256]
    assert cfg.model.num_layers == 4 and cfg.model.vocab_size == 2000
    assert all(s.num_steps >= 1 for s in cfg.stages)


def _write(tmp_path, mutate):
    data = yaml.safe_load(TINY.read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _stage(data, name):
    return next(s for s in data["stages"] if s["name"] == name)


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d["optimizer"].update(lr="fast"), "optimizer.lr"),
    (lambda d: d["optimizer"].update(min_lr=1.0), "optimizer.min_lr"),
    (lambda d: d["optimizer"].update(beta2=1.5), "optimizer.beta2"),
    (lambda d: d["schedule"].update(style="step"), "schedule.style"),
    (lambda d: d["schedule"].update(decay_tokens=10**9), "schedule.decay_tokens"),
    (lambda d: d["schedule"].update(warmup_tokens=10**9), "schedule.warmup_tokens"),
    (lambda d: _stage(d, "stage2").update(batch_tokens=2000), "stages.stage2.batch_tokens"),
    (lambda d: _stage(d, "stage2").update(token_budget=100), "stages.stage2.token_budget"),
    (lambda d: _stage(d, "stage3").update(seq_length=4096), "stages.stage3.seq_length"),
    (lambda d: _stage(d, "stage1").update(seq_len=64), "stages.stage1: unknown field(s) seq_len"),
    (lambda d: _stage(d, "stage2").update(name="stage1"), "stages[1].name: duplicate stage name"),
    (lambda d: d.update(nan_policy="ignore"), "nan_policy"),
    (lambda d: d.setdefault("build", {}).update(precision="fp8"), "build.precision"),
    (lambda d: d.setdefault("build", {}).update(fused_loss=True, loss_kernel="triton"),
     "build.loss_kernel: must be one of eager, compiled"),
    (lambda d: d.setdefault("build", {}).update(fused_loss=False, loss_kernel="compiled"),
     "build.loss_kernel: 'compiled' applies to the fused loss"),
    (lambda d: d.update(micro_batch_size=3), "stages.stage1.batch_tokens"),
    (lambda d: d["parallel"].update(tensor_model_parallel_size=3), "parallel.tensor_model_parallel_size"),
    (lambda d: d["parallel"].update(overlap_param_gather=True), "parallel.overlap_param_gather: needs"),
    (lambda d: d["parallel"].update(ddp_bucket_size=0), "parallel.ddp_bucket_size"),
    (lambda d: d["checkpoint"].update(interval=0), "checkpoint.interval"),
    (lambda d: d["model"].update(presett="x"), "model: unknown field(s) presett"),
    # types inside model: are checked too (they used to reach torch as a TypeError traceback)
    (lambda d: d["model"].update(hidden_size="wide"), "model.hidden_size: must be an integer, got 'wide'"),
    (lambda d: d["model"].update(hidden_size=64.5), "model.hidden_size: must be an integer, got 64.5"),
    (lambda d: d["model"].update(transformer_impl="flash"), "model.transformer_impl: must be one of auto, te"),
    (lambda d: d["model"].update(tie_word_embeddings="yes"), "model.tie_word_embeddings: must be true or false"),
    # keys that moved say where they live now
    (lambda d: d.update(precision="bf16"), "precision: moved to build.precision"),
    (lambda d: d.update(fused_loss=True), "fused_loss: moved to build.fused_loss"),
    (lambda d: d.update(data={"seed": 3}), "data.seed: moved to seed"),
    (lambda d: d.update(optimiser={}), "unknown field(s) optimiser"),
])
def test_errors_name_file_and_field(tmp_path, mutate, field):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert str(err.value).startswith(f"{path}: ") and field in str(err.value), str(err.value)


def test_integral_floats_are_integers():
    cfg = load_train_config(TINY, ["model.hidden_size=64.0", "stages.stage1.token_budget=6.5536e4"])
    assert cfg.model.hidden_size == 64 and type(cfg.model.hidden_size) is int
    assert cfg.stage("stage1").token_budget == 65536 and type(cfg.stage("stage1").token_budget) is int


def test_overrides_address_stages_by_name_and_parse_types():
    data = {"stages": [{"name": "stage1", "seq_length": 64}, {"name": "stage2", "seq_length": 128}], "a": {}}
    apply_overrides(data, ["stages.stage2.seq_length=256", "a.b.c=true", "a.x=1e-3", "stages.0.data=p"])
    assert data["stages"][1]["seq_length"] == 256 and data["stages"][0]["data"] == "p"
    assert data["a"]["b"]["c"] is True and data["a"]["x"] == "1e-3"  # numbers-as-strings are coerced later
    cfg = load_train_config(TINY, ["optimizer.lr=1e-3", "stages.stage3.token_budget=4096"])
    assert cfg.optimizer.lr == 1e-3 and cfg.stage("stage3").token_budget == 4096
    with pytest.raises(ConfigError, match="no list entry named 'stage9'"):
        load_train_config(TINY, ["stages.stage9.seq_length=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_train_config(TINY, ["optimizer.lr"])


def test_cli_bad_config_exits_2_naming_the_field(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEGAFOX_OVERRIDES", raising=False)
    path = _write(tmp_path, lambda d: d["optimizer"].update(eps=0))
    assert main(["--config", str(path), "--stage", "stage1"]) == 2
    err = capsys.readouterr().err
    assert "megafox-train: error:" in err and f"{path}: optimizer.eps: must be > 0" in err
    assert "Traceback" not in err
    assert main(["--config", str(TINY), "--stage", "stage7"]) == 2
    assert "--stage: unknown stage 'stage7'" in capsys.readouterr().err
    monkeypatch.setenv("MEGAFOX_OVERRIDES", "micro_batch_size=0")
    assert main(["--config", str(TINY), "--stage", "stage1"]) == 2
    assert "micro_batch_size: must be >= 1" in capsys.readouterr().err


def test_cli_stage_order(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEGAFOX_OVERRIDES", f"checkpoint.dir={tmp_path}")
    exit_file = tmp_path / "exit"
    monkeypatch.setenv("MEGAFOX_EXIT_FILE", str(exit_file))
    assert main(["--config", str(TINY), "--stage", "stage2"]) == 2
    assert "stage stage1 comes first and is not complete" in capsys.readouterr().err
    assert exit_file.read_text().strip() == "2"
    for stage in ("stage1", "stage2"):
        records.write_stage_done(tmp_path, records.StageDone(stage, iteration=1, consumed_tokens=1, stage_samples=1))
    assert main(["--config", str(TINY), "--stage", "stage2"]) == 0
    assert "stage stage2 already complete" in capsys.readouterr().out
    assert exit_file.read_text().strip() == "0"


def test_rotation_keeps_last_k_latest_and_stage_ends(tmp_path):
    def make(it, stage_end=False, complete=True):
        d = iteration_dir(tmp_path, it)
        d.mkdir()
        (d / "shard").write_text("x")
        if complete:
            records.write_checkpoint_record(d, records.CheckpointRecord(
                iteration=it, kind="model-only", model=fox1_tiny(), layout=records.SavedLayout(), stage_end=stage_end))

    for it in (10, 20, 30, 40, 50):
        make(it, stage_end=(it == 20))
    make(25, complete=False)  # a crashed save older than latest
    make(60, complete=False)  # a save in progress (or crashed) newer than latest
    write_latest(tmp_path, 50)
    assert rotate_checkpoints(tmp_path, keep_last=2) == [10, 30]
    left = sorted(p.name for p in tmp_path.glob("iter_*"))
    assert left == ["iter_0000020", "iter_0000040", "iter_0000050", "iter_0000060"]
    assert list_checkpoints(tmp_path) == [20, 40, 50]
