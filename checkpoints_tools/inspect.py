"""Show what a megafox checkpoint holds without loading it.

    megafox-ckpt inspect --checkpoint DIR [--iteration N|latest] [--json] [--all]
    python -m checkpoints_tools.inspect --checkpoint DIR

Iteration, stage, consumed tokens, the layout it was saved with, the model config and every
model tensor's global shape and dtype (--all adds optimizer and other state).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from checkpoints_tools.common import parse_iteration, run_cli
from megafox.checkpoint.reader import DistCheckpoint

SHOWN_KEYS = ("iteration", "kind", "stage", "consumed_tokens", "consumed_samples", "source", "tokenizer")


def summary(ckpt: DistCheckpoint, all_tensors: bool = False) -> Dict[str, Any]:
    model_keys = set(ckpt.model_keys())
    tensors = {k: {"shape": list(ckpt.shape(k)), "dtype": str(ckpt.dtype(k)).replace("torch.", "")}
               for k in sorted(ckpt.tensors) if all_tensors or k in model_keys}
    other = sorted(k for k in ckpt.metadata.state_dict_metadata if k not in model_keys)
    return {
        "path": str(ckpt.path),
        **{k: ckpt.meta.get(k) for k in SHOWN_KEYS if k in ckpt.meta},
        **ckpt.progress,
        "layout": ckpt.meta.get("layout"),
        "model": ckpt.meta.get("model"),
        "model_bytes": ckpt.nbytes(),
        "has_optimizer_state": any(k.startswith("optimizer") for k in other),
        "other_entries": len(other),
        "tensors": tensors,
    }


def _print(s: Dict[str, Any]) -> None:
    print(f"checkpoint   {s['path']}")
    for k in SHOWN_KEYS:
        if k in s:
            print(f"{k:<12} {s[k]}")
    p = s.get("layout") or {}
    print(f"layout       tp={p.get('tp')} pp={p.get('pp')} vpp={p.get('vpp')} dp={p.get('dp')} (saved with; loads at any)")
    m = s.get("model") or {}
    print(f"model        {m.get('name')}: {m.get('num_layers')} layers, hidden {m.get('hidden_size')}, ffn "
          f"{m.get('ffn_hidden_size')}, heads {m.get('num_attention_heads')}/{m.get('num_query_groups')} kv, vocab "
          f"{m.get('vocab_size')}, tied={m.get('tie_word_embeddings')}")
    print(f"weights      {s['model_bytes'] / 1e9:.3f} GB; optimizer state: {'yes' if s['has_optimizer_state'] else 'no'}; "
          f"{s['other_entries']} other entries")
    width = max((len(k) for k in s["tensors"]), default=0)
    for k, t in s["tensors"].items():
        print(f"  {k:<{width}}  {t['dtype']:<8} {t['shape']}")


def _main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megafox-ckpt inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--iteration", default="latest")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--all", action="store_true", help="list optimizer/other tensors too")
    a = p.parse_args(argv)
    s = summary(DistCheckpoint(a.checkpoint, parse_iteration(a.iteration)), a.all)
    if a.json:
        print(json.dumps(s, indent=2))
    else:
        _print(s)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
