"""`python -m megafox.torchrun ARGS` = `torchrun ARGS`, minus the report it prints when a rank exits
non-zero. launch/local.sh uses it: the trainer has already said in one line why it stopped (and
75, "saved, run again", is not a failure at all), and the launcher exits with the trainer's own
status (MEGAFOX_EXIT_FILE), so torchrun's ~30-line ChildFailedError traceback only buries that
line. Anything else torchrun reports (rendezvous or agent errors) is left as it is.
"""
import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


class _QuietWorkerExit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "failed (exitcode:" not in record.getMessage()


if __name__ == "__main__":
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietWorkerExit())
    try:
        main()
    except ChildFailedError:
        sys.exit(1)
