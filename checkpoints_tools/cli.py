"""`megafox-ckpt {inspect,verify,reshard,to-hf,from-hf} ...`: one entry point for the checkpoint tools."""
from __future__ import annotations

import sys
from typing import List, Optional

USAGE = "usage: megafox-ckpt {inspect,verify,reshard,to-hf,from-hf} [options]  (--help after a command for its options)"


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    warnings.filterwarnings("ignore")  # before the imports: megatron-core warns that TE/apex are absent
    from checkpoints_tools import from_hf, inspect, integrity, reshard, to_hf

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"inspect": inspect.main, "verify": integrity.main, "reshard": reshard.main, "to-hf": to_hf.main, "from-hf": from_hf.main}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
