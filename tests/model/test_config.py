"""Config validation: each invalid case fails at start-up with a message naming the field."""
import pytest

from megafox.config import ConfigError, ParallelConfig, fox1_1p6b, fox1_tiny, load_yaml, model_from_dict, validate_seq_length
from megafox.info import memory_per_gpu
from tests.support.processes import run_module


def test_fox1_preset_matches_released_config():
    m = fox1_1p6b().validate()
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (32, 2048, 4096, 16, 4)
    assert (m.vocab_size, m.head_dim, m.max_position_embeddings, m.tie_word_embeddings) == (256000, 128, 8192, True)
    assert (m.rope_theta, m.norm_eps, m.bos_token_id, m.eos_token_id) == (10000.0, 1e-5, 1, 2)
    assert m.padded_vocab_size(1) == 256000 and m.padded_vocab_size(8) == 256000


@pytest.mark.parametrize("layout,field", [
    (dict(tensor_model_parallel_size=3), "parallel.tensor_model_parallel_size"),  # 16 heads / 3
    (dict(tensor_model_parallel_size=8), "parallel.tensor_model_parallel_size"),  # 4 KV heads / 8
    (dict(pipeline_model_parallel_size=3), "parallel.pipeline_model_parallel_size"),  # 32 layers / 3
    (dict(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=3), "parallel.pipeline_model_parallel_size"),
    (dict(virtual_pipeline_model_parallel_size=2), "parallel.virtual_pipeline_model_parallel_size"),
    (dict(sequence_parallel=True), "parallel.sequence_parallel"),
    (dict(tensor_model_parallel_size=0), "parallel.tensor_model_parallel_size"),
])
def test_invalid_layouts_name_the_field(layout, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ParallelConfig(**layout).validate(fox1_1p6b())


def test_world_size_must_divide():
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        ParallelConfig(tensor_model_parallel_size=4).validate(fox1_1p6b(), world_size=6)
    assert ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).data_parallel_size(16) == 4


def test_seq_length_limit():
    with pytest.raises(ConfigError, match="seq_length.*8192"):
        validate_seq_length(16384, fox1_1p6b())
    validate_seq_length(8192, fox1_1p6b())


@pytest.mark.parametrize("override,field", [
    ({"num_query_groups": 3}, "model.num_query_groups"),
    ({"num_attention_heads": 0}, "model.num_attention_heads"),
    ({"transformer_impl": "flash"}, "model.transformer_impl"),
    ({"eos_token_id": 300000}, "model.eos_token_id"),
    ({"hidden_size": 100}, "model.hidden_size"),
    ({"bogus": 1}, "model: unknown field"),
])
def test_invalid_model_fields(override, field):
    with pytest.raises(ConfigError, match=field):
        model_from_dict({"preset": "fox1-1.6b", **override})


def test_unknown_preset_and_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'fox2'"):
        model_from_dict({"preset": "fox2"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_preset_with_overrides():
    m = model_from_dict({"preset": "fox1-1.6b", "num_layers": 16})
    assert m.num_layers == 16 and m.hidden_size == 2048
    assert model_from_dict({"preset": "fox1-tiny"}) == fox1_tiny().validate()


def test_info_cli_prints_exact_count_and_rejects_bad_layout():
    out = run_module("megafox.cli", "info", "--preset", "fox1-1.6b", "--seq-length", "8192", "--tp", "2", "--pp", "2",
                     "--dp", "8")
    assert out.returncode == 0, out.stderr
    assert "parameters: 1,665,271,808" in out.stdout
    assert "16.43 GFLOP" in out.stdout  # 6N + 12 L S h at 8K
    assert "total" in out.stdout
    bad = run_module("megafox.cli", "info", "--tp", "3")
    assert bad.returncode == 2
    assert "parallel.tensor_model_parallel_size" in bad.stderr and "Traceback" not in bad.stderr


def test_memory_estimate_counts_one_loss_chunk_with_the_fused_loss():
    model = fox1_1p6b()
    fused = memory_per_gpu(model, 8192, fused_loss=True).logits
    unfused = memory_per_gpu(model, 8192, fused_loss=False).logits
    assert fused == 6.0 * 1024 * 256000  # one 1024-token chunk: fp32 softmax + bf16 gradient
    assert unfused == 8.0 * 8192 * 256000  # fp32 logits of every token + their gradient
