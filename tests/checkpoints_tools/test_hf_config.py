"""config.json / generation_config.json content: fox1-1.6b equals the released Fox-1's."""
import pytest
import torch

from checkpoints_tools.common import ToolError, parse_size
from checkpoints_tools.to_hf import hf_configs
from megafox.config import fox1_1p6b

# tensoropera/Fox-1-1.6B config.json (transformers 4.39.3), minus transformers_version.
FOX1_RELEASED = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 4096, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 16, "num_hidden_layers": 32, "num_key_value_heads": 4,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 256000,
}


def test_fox1_config_matches_release():
    config, generation = hf_configs(fox1_1p6b(), torch.bfloat16, {"bos": 1, "eos": 2, "pad": None})
    for key, value in FOX1_RELEASED.items():
        assert config[key] == value, key
    assert set(config) - set(FOX1_RELEASED) <= {"head_dim", "mlp_bias"}  # explicit defaults only
    assert config["head_dim"] == 128 and config["mlp_bias"] is False
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


def test_special_ids_come_from_the_tokenizer():
    config, generation = hf_configs(fox1_1p6b(), torch.float32, {"bos": 2, "eos": 1, "pad": 0})
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (2, 1, "float32")
    assert generation == {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KB") == 100_000 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234
    with pytest.raises(ToolError, match="max-shard-size"):
        parse_size("lots")
