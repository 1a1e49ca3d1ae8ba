"""`megafox-ckpt {inspect,verify,reshard,to-hf,from-hf} ...`: one entry point for the checkpoint tools."""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

USAGE = "usage: megafox-ckpt {inspect,verify,reshard,to-hf,from-hf} [options]  (--help after a command for its options)"
# command -> the module whose main(argv) runs it; imported only once chosen (megatron-core is slow
# to import, and a mistyped command should be answered at once)
COMMANDS = {"inspect": "checkpoints_tools.inspect", "verify": "checkpoints_tools.verify",
            "reshard": "checkpoints_tools.reshard", "to-hf": "checkpoints_tools.to_hf",
            "from-hf": "checkpoints_tools.from_hf"}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        # one line, as every megafox command reports bad input, with the choices in it
        given = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"megafox-ckpt: error: {given} (choose from: {', '.join(COMMANDS)}; "
              f"`megafox-ckpt COMMAND --help` for its options)", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore")  # before the imports: megatron-core warns that TE/apex are absent
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
