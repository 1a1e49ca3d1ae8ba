"""`megafox-train --config CONFIG.yaml --stage STAGE` (= `python -m megafox.train`).

Runs one curriculum stage under torchrun (or srun: ranks from SLURM_* variables). Overrides come
from `--override key.sub=value` (repeatable) and the environment variable MEGAFOX_OVERRIDES
("a.b=1 c.d=x"; command-line overrides win). Exit statuses: megafox/runtime/process.py.
"""
from megafox.runtime.process import hold_stop_signals

hold_stop_signals()  # first, before the slow imports: a stop signal now waits for the trainer's handler

import argparse  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from megafox.config import ConfigError, load_train_config  # noqa: E402
from megafox.runtime.dist import rank  # noqa: E402
from megafox.runtime.process import (EXIT_CONFIG, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_NAN,  # noqa: E402
                                     EXIT_HUNG, EXIT_NO_CHECKPOINT, EXIT_OK, EXIT_RENDEZVOUS, exit_with_parent)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="megafox-train", description="Train one curriculum stage of a megafox run.",
        epilog="exit status: 0 stage complete, 75 stopped after saving (requeue), 2 bad config, "
               "3 halted on NaN/inf (nan_policy: halt), 4 no usable checkpoint, 5 checkpoint dir in use, "
               "6 hung or lost rank (watchdog), 7 rendezvous failed, 130 interrupted, 1 other failure")
    parser.add_argument("--config", required=True, help="training YAML (configs/train/*.yaml)")
    parser.add_argument("--stage", required=True, help="stage name from the config's `stages`")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="set a config field, e.g. checkpoint.dir=/scratch/run1 or stages.stage1.token_budget=1e6")
    parser.add_argument("--load", default=None, metavar="DIR",
                        help="checkpoint root to start from when checkpoint.dir has none yet (its `latest`)")
    parser.add_argument("--exit-after-minutes", type=float, default=None, metavar="M",
                        help="save and exit 75 once M minutes have passed (checked after every step)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even when the config changes what the checkpoint has trained "
                             "(model shape, seed, a trained stage's data or length); reported either way")
    return parser.parse_args(argv)


def _error(message: str) -> None:
    if rank() == 0:
        print(f"megafox-train: error: {message}", file=sys.stderr, flush=True)


def main(argv=None, callbacks: Sequence = ()) -> int:
    """`callbacks`: extra training callbacks (tests.support.faults installs its fault injectors here)."""
    exit_with_parent()
    status = _run(parse_args(argv), callbacks)
    _report_status(status)
    return status


def _report_status(status: int) -> None:
    """torchrun exits 1 whatever its workers' statuses were; with MEGAFOX_EXIT_FILE set, rank 0
    also writes its status there so a launcher (launch/local.sh, SLURM scripts) can exit with
    it and requeue on 75."""
    path = os.environ.get("MEGAFOX_EXIT_FILE")
    if path and rank() == 0:
        try:
            with open(path, "w") as f:
                f.write(f"{status}\n")
        except OSError as exc:
            print(f"megafox-train: cannot write MEGAFOX_EXIT_FILE {path}: {exc}", file=sys.stderr)


def _run(args: argparse.Namespace, callbacks: Sequence = ()) -> int:
    # here, not at the top: `--help` and a bad flag answer without loading torch and megatron (seconds)
    from megafox.checkpoint.errors import CheckpointError, NoUsableCheckpoint
    from megafox.checkpoint.run_lock import RunLocked
    from megafox.checkpoint.saver import CheckpointSaveError
    from megafox.parallel.process_groups import RendezvousFailed
    from megafox.training.curriculum import check_stage_order
    from megafox.training.loop import Trainer, TrainingHalted, log

    overrides = shlex.split(os.environ.get("MEGAFOX_OVERRIDES", "")) + list(args.override)
    if args.exit_after_minutes is not None and args.exit_after_minutes <= 0:
        _error(f"--exit-after-minutes: must be > 0, got {args.exit_after_minutes}")
        return EXIT_CONFIG
    trainer: Optional[Trainer] = None
    try:
        config = load_train_config(args.config, overrides)
        config.stage(args.stage)
        complete = check_stage_order(config, args.stage)
        if complete:
            log(f"{complete}; nothing to do")
            return EXIT_OK
        trainer = Trainer(config, args.stage, args.load, args.exit_after_minutes, callbacks=callbacks,
                          allow_config_change=args.allow_config_change)
        trainer.setup()
        return trainer.run()
    except RendezvousFailed as exc:
        print(f"megafox-train: error: {exc}", file=sys.stderr, flush=True)  # every rank: each names itself
        return EXIT_RENDEZVOUS
    except RunLocked as exc:
        _error(str(exc))
        return EXIT_LOCKED
    except CheckpointSaveError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except NoUsableCheckpoint as exc:
        _error(str(exc))
        return EXIT_NO_CHECKPOINT
    except (ConfigError, CheckpointError) as exc:
        _error(str(exc))
        return EXIT_CONFIG
    except TrainingHalted as exc:
        _error(f"halted: {exc}")
        return EXIT_NAN
    except KeyboardInterrupt:
        _error("interrupted (Ctrl-C): stopped without saving; the last complete checkpoint is intact")
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        aborted = trainer.watchdog.abort_reason() if trainer is not None and trainer.watchdog is not None else None
        if aborted:  # a peer's watchdog ended the job; this rank's collective failed as a result
            print(f"megafox-train: error: stopped by the watchdog: {aborted}", file=sys.stderr, flush=True)
            return EXIT_HUNG
        return EXIT_FAILURE
    finally:
        if trainer is not None:
            trainer.stop.uninstall()
            _shutdown()
            if trainer.watchdog is not None:
                trainer.watchdog.stop()


def _shutdown() -> None:
    try:
        from megafox.parallel.process_groups import destroy_distributed  # loaded by _run already; kept off `--help`'s path

        destroy_distributed()
    except Exception:  # tearing down after a failure must not hide the exit status
        pass


if __name__ == "__main__":
    sys.exit(main())
