"""Export a megafox checkpoint (any TP/PP) as a Hugging Face LlamaForCausalLM directory.

    megafox-to-hf --checkpoint DIR [--iteration N|latest] --output HF_DIR [--dtype bf16|fp16|fp32]
                  [--tokenizer MODEL] [--max-shard-size 5GB] [--verify [--tolerance 1e-3]]

Writes config.json, generation_config.json, model.safetensors (sharded with an index past
--max-shard-size) and, given a SentencePiece tokenizer (or one recorded in the checkpoint's
megafox.json), tokenizer.model + tokenizer.json + tokenizer_config.json. Tensors stream from the
dist checkpoint one layer at a time straight into the safetensors files.
Everything is written to a temporary sibling of HF_DIR and swapped in only when complete (and,
with --verify, verified): a failure leaves an earlier export in HF_DIR untouched.
Exit codes: 0 ok, 2 bad input (one-line message), 1 --verify found a mismatch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from checkpoints_tools import hf_compare
from checkpoints_tools.common import EXIT_VERIFY_FAILED, ToolError, parse_dtype, parse_iteration, parse_size, run_cli
from checkpoints_tools.hf_tokenizer import resolve_model_file, write_hf_tokenizer
from checkpoints_tools.output_dir import StagedExport
from checkpoints_tools.safetensors_stream import StreamingSafetensorsWriter, is_weights_file
from checkpoints_tools.streams import groups_from_checkpoint, prefetch
from data_prep.chat_template import load_chat_template
from data_prep.common import DataPrepError
from megafox.checkpoint.layout import describe_checkpoint, holds_checkpoint
from megafox.checkpoint.reader import DistCheckpoint
from megafox.formats.dtypes import dtype_name
from megafox.model.hf_adapter import MCORE_EMBEDDING, hf_plan
from megafox.model.hf_mapping import hf_config_dict


def hf_configs(model, dtype: torch.dtype, ids: Dict[str, Optional[int]]):
    """config.json and generation_config.json; special ids are the tokenizer's."""
    config = hf_config_dict(model, dtype_name(dtype))
    config["bos_token_id"], config["eos_token_id"] = ids["bos"], ids["eos"]
    generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"]}
    if ids.get("pad") is not None:
        generation["pad_token_id"] = ids["pad"]
    return config, generation


def tokenizer_source(arg: Optional[str], meta: dict) -> Optional[str]:
    if arg:
        return arg
    recorded = meta.get("tokenizer")
    if isinstance(recorded, dict):
        recorded = recorded.get("path")
    return recorded if isinstance(recorded, str) and Path(recorded).expanduser().exists() else None


def chat_template_source(arg: Optional[str], meta: dict) -> Optional[str]:
    """--chat-template (a built-in name or a .jinja file), else the one the checkpoint's SFT data
    was rendered with (recorded by the trainer), else none (a base model)."""
    if arg:
        try:
            return load_chat_template(arg).text
        except DataPrepError as exc:
            raise ToolError(f"--chat-template: {exc}") from None
    recorded = meta.get("tokenizer")
    return recorded.get("chat_template") if isinstance(recorded, dict) else None


def convert(ckpt: DistCheckpoint, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
            max_shard_bytes: int = 5 * 10**9, tokenizer: Optional[str] = None, progress: bool = True,
            chat_template: Optional[str] = None) -> Dict:
    """Write the export into `out_dir` (a fresh directory: the caller stages it)."""
    ckpt.validate()
    model = ckpt.model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        ids = write_hf_tokenizer(resolve_model_file(tokenizer), out_dir, model.max_position_embeddings,
                                 vocab_limit=model.vocab_size, chat_template=chat_template)
        if ids["bos"] is None or ids["eos"] is None:
            raise ToolError(f"tokenizer {tokenizer}: has no bos/eos piece; an exported Llama needs both")
    else:
        print("warning: no --tokenizer (and none recorded in megafox.json): writing the model only; "
              "bos/eos ids come from the checkpoint's model config", file=sys.stderr)
        ids = {"bos": model.bos_token_id, "eos": model.eos_token_id, "pad": None}
    config, generation = hf_configs(model, dtype, ids)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    writer = StreamingSafetensorsWriter(out_dir, hf_plan(model), dtype, max_shard_bytes)
    groups = prefetch(groups_from_checkpoint(ckpt, dtype))
    if progress:
        from tqdm import tqdm

        groups = tqdm(groups, total=model.num_layers + 2, desc="to_hf", unit="part", file=sys.stderr)
    for group in groups:
        for name, tensor in group.items():
            writer.add(name, tensor)
    files = writer.close()
    return {"files": files, "bytes": writer.total, "ids": ids}


def _args(argv: Optional[List[str]]):
    p = argparse.ArgumentParser(prog="megafox-to-hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint root (with 'latest') or an iter_N directory")
    p.add_argument("--iteration", default="latest", help="iteration number or 'latest' (default)")
    p.add_argument("--output", required=True, help="HF directory to write")
    p.add_argument("--dtype", default="bf16", help="bf16 (default, as Fox-1 is released), fp16 or fp32")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (or a directory with tokenizer.model)")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors past this size (default 5GB)")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                   help="chat template for tokenizer_config.json (default: the one the checkpoint's SFT data used)")
    p.add_argument("--verify", action="store_true", help="compare transformers' and megafox's logits afterwards")
    p.add_argument("--tolerance", type=float, default=None, help="max |logit diff| for --verify (default 1e-3)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _main(argv: Optional[List[str]] = None) -> int:
    a = _args(argv)
    dtype, shard = parse_dtype(a.dtype), parse_size(a.max_shard_size)
    iteration = parse_iteration(a.iteration)
    ckpt = DistCheckpoint(a.checkpoint, iteration)
    output = Path(a.output)
    if holds_checkpoint(output):  # swapping an export in would move a training run aside
        raise ToolError(f"--output {output}: holds {describe_checkpoint(output)}; an export needs a directory of its own")
    tok = tokenizer_source(a.tokenizer, ckpt.meta)
    template = chat_template_source(a.chat_template, ckpt.meta)
    if template and not tok:
        raise ToolError("--chat-template: a chat template needs the tokenizer (--tokenizer, or one recorded in the checkpoint)")
    with StagedExport(output) as staged:
        result = convert(ckpt, staged.path, dtype, shard, tok, progress=not a.no_progress, chat_template=template)
        # ckpt.path is the exported iteration's own directory (iteration None: that directory itself)
        if a.verify and not hf_compare.hf_matches_checkpoint(staged.path, str(ckpt.path), None, ckpt.model,
                                                         ckpt.shape(MCORE_EMBEDDING)[0], a.tolerance, round_to=dtype):
            print(f"not written: {output} left as it was", file=sys.stderr, flush=True)
            return EXIT_VERIFY_FAILED
        # weights of an earlier export in the same directory are dropped, so transformers never
        # mixes two exports; anything else there (a README, say) is kept
        staged.publish(keep_old=lambda name: not is_weights_file(name))
    print(f"wrote {output}: iteration {ckpt.iteration}, {len(result['files'])} safetensors file(s), "
          f"{result['bytes'] / 1e9:.2f} GB {dtype_name(dtype)}" + (", tokenizer" if tok else "")
          + (", chat template" if template else ""), flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
