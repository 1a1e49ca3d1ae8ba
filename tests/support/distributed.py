"""Run a test body on N ranks under `torchrun` (gloo on CPU) and collect what rank 0 returns.

A body is `path/to/file.py:function`; it is called on every rank as `function(**kwargs)` after
megatron-core's parallel state is set up for the requested layout, and rank 0's return value
(anything torch.save can write) comes back to the test.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from megafox.config import ParallelConfig
from megafox.parallel.process_groups import destroy_distributed, init_distributed
from megafox.runtime.dist import free_port

REPO = Path(__file__).resolve().parents[2]


def run_distributed(body: str, nproc: int, layout: Optional[Dict[str, Any]] = None,
                    kwargs: Optional[Dict[str, Any]] = None, timeout: float = 300) -> Any:
    """Run `body` on `nproc` ranks; return rank 0's result or raise with the ranks' output."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.pt"
        spec = {"body": body, "layout": layout or {}, "kwargs": kwargs or {}, "result": str(result)}
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "tests.support.distributed", str(spec_file)]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{body} on {nproc} ranks failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        return torch.load(result, weights_only=False)


def _main(spec_file: str) -> None:
    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_file).read_text())
    init_distributed(ParallelConfig(**spec["layout"]))
    path, name = spec["body"].rsplit(":", 1)
    module_spec = importlib.util.spec_from_file_location("megafox_test_body", REPO / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    out = getattr(module, name)(**spec["kwargs"])
    if torch.distributed.get_rank() == 0:
        torch.save(out, spec["result"])
    torch.distributed.barrier()
    destroy_distributed()


if __name__ == "__main__":
    _main(sys.argv[1])
