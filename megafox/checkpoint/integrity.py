"""Checksums of every file a checkpoint save writes, and their verification before a resume.

Each rank digests the files it wrote itself (its `__<rank>_*.distcp` shards, as its writer
threads finish them (megafox.checkpoint.writer); rank 0 also megatron-core's `.metadata`,
`common.pt` and `metadata.json` at the commit), reading them back from the page cache, and rank 0
records all of them in the checkpoint's megafox.json
(`files`: name -> size and CRC-32). CRC-32 is zlib's (the standard library): ~1 GB/s on one core
here, and each rank digests only its own shards, so a Fox-1 save at DP 64 costs each rank about
0.4 GB of reading (bench/checkpoint_integrity.py measures it). Verification spreads the files
over the ranks the same way, so a resume reads each byte once in total, not once per rank.

What is detected: a missing, truncated or grown file, any changed byte (a single flipped bit
changes the CRC), an unreadable record; and (`check_loads_without_code`) index files that would
unpickle anything but data, however their digests were recorded. A checkpoint saved without digests (before this
existed) is checked for presence and size of every shard its `.metadata` index names.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch.distributed as dist

from megafox.checkpoint.errors import CheckpointError, NoUsableCheckpoint
from megafox.checkpoint.layout import LATEST_FILE, iteration_dir, list_checkpoints, resolve_iteration
from megafox.checkpoint.safe_load import read_dcp_metadata, safe_torch_load
from megafox.records import METADATA_FILE, CheckpointRecord, read_checkpoint_record
from megafox.runtime.dist import is_rank0

ALGORITHM = "crc32"
_CHUNK = 8 << 20
# megatron-core's own files, written by rank 0 (the shards are `__<rank>_<n>.distcp`)
_COORDINATOR_FILES = (".metadata", "common.pt", "metadata.json")


def digest(path: Path) -> Dict[str, object]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
    return {"size": size, ALGORITHM: f"{crc:08x}"}


def files_of_rank(directory: Path, rank: int) -> List[str]:
    """The files of a just-saved checkpoint directory that `rank` wrote."""
    names = sorted(p.name for p in Path(directory).iterdir() if p.is_file())
    mine = [n for n in names if n.startswith(f"__{rank}_") and n.endswith(".distcp")]
    if rank == 0:
        mine += [n for n in names if n in _COORDINATOR_FILES]
    return mine


def digest_saved_files(directory: Path, written: Optional[Dict[str, Dict[str, object]]] = None
                       ) -> Optional[Dict[str, Dict[str, object]]]:
    """Collective: every rank digests its own files; rank 0 gets them all (others get None).
    `written`: digests of this rank's shards already taken by the writer (megafox.checkpoint.writer
    digests each file as it finishes it), so only what is missing is read here."""
    directory = Path(directory)
    written = dict(written or {})
    if not dist.is_initialized():
        names = sorted(set(files_of_rank(directory, 0)) | {p.name for p in directory.glob("__*.distcp")})
        return {n: written.get(n) or digest(directory / n) for n in names}
    mine = {n: written.get(n) or digest(directory / n) for n in files_of_rank(directory, dist.get_rank())}
    gathered: List[Optional[Dict]] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    return {name: d for part in gathered for name, d in part.items()}


def check_files(directory: Path, files: Dict[str, Dict[str, object]], names: Iterable[str]) -> Optional[str]:
    """The first problem with `names` (a subset of the recorded files), or None. Sizes first: cheap."""
    directory = Path(directory)
    names = list(names)
    for name in names:
        path = directory / name
        if not path.is_file():
            return f"{path}: missing (the save recorded it)"
        size = path.stat().st_size
        if size != files[name]["size"]:
            return f"{path}: {size} bytes, the save wrote {files[name]['size']} (truncated or overwritten)"
    for name in names:
        want = files[name].get(ALGORITHM)
        if want is not None and digest(directory / name)[ALGORITHM] != want:
            return f"{directory / name}: checksum mismatch (the file changed after it was saved)"
    return None


def check_index(directory: Path) -> Optional[str]:
    """For checkpoints without recorded digests: every shard the `.metadata` index names is there
    and long enough. The index is read without unpickling anything but DCP's own classes."""
    directory = Path(directory)
    try:
        metadata = read_dcp_metadata(directory)
    except Exception as exc:  # CheckpointError (unsafe / unreadable) or anything the file throws
        return str(exc) if str(directory) in str(exc) else f"{directory / '.metadata'}: unreadable ({exc})"
    need: Dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        path = directory / name
        if not path.is_file():
            return f"{path}: missing shard file (named in .metadata)"
        if path.stat().st_size < size:
            return f"{path}: truncated shard file ({path.stat().st_size} bytes, the index needs {size})"
    return None


def check_loads_without_code(directory: Path) -> Optional[str]:
    """The pickled files a resume unpickles before any tensor (DCP's `.metadata` index and
    megatron-core's `common.pt`) hold plain data only: a file that names anything else (a planted
    `os.system`...) is reported, naming the file and what it references, without running it."""
    directory = Path(directory)
    try:
        read_dcp_metadata(directory)
    except CheckpointError as exc:
        return str(exc)
    common = directory / "common.pt"
    if common.is_file():
        try:
            safe_torch_load(common)
        except CheckpointError as exc:
            return str(exc)
        except Exception as exc:  # not torch's format, or data torch's weights_only loader refuses
            return f"{common}: refused to load: not plain checkpoint data ({_first_reason(exc)})"
    return None


def _first_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    told = [line for line in lines if line.startswith(("Unsupported", "Trying to load"))]
    return (told or lines or [type(exc).__name__])[0][:160]


def check_digests(directory: Path, files: Optional[Dict[str, Dict[str, object]]]) -> Optional[str]:
    """The files of `directory` against the digests its save recorded (`files`; None for a
    checkpoint saved before digests existed: `check_index`). Collective when torch.distributed is
    up: each rank checks its share of the files; every rank gets the same answer (the first
    problem found, or None)."""
    if files is None:
        problem = check_index(directory) if is_rank0() else None
        return agree(problem)
    names = sorted(files)
    share = names[dist.get_rank()::dist.get_world_size()] if dist.is_initialized() else names
    return agree(check_files(directory, files, share))


def agree(problem: Optional[str]) -> Optional[str]:
    if not dist.is_initialized():
        return problem
    found: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    return next((p for p in found if p), None)


def check_usable(directory: Union[str, Path], files: Optional[Dict[str, Dict[str, Any]]]) -> Optional[str]:
    """The first problem that makes a saved checkpoint unusable, or None: what a resume checks
    before it loads, and what `megafox-ckpt verify` reports. Collective when distributed. Its
    files against the digests the save recorded, then the pickled index files a load opens
    first: anything in them but plain data (code planted in `.metadata` or `common.pt`) is named
    and never run."""
    problem = check_digests(Path(directory), files)
    if problem is None:
        problem = agree(check_loads_without_code(Path(directory)) if is_rank0() else None)
    return problem


def find_usable_checkpoint(root: Union[str, Path]) -> Tuple[CheckpointRecord, List[str]]:
    """The newest checkpoint under `root` (from `latest` down) whose record reads and whose files
    verify against the digests the save recorded; also the reasons the newer ones were skipped
    (each one line naming the bad file). `root` may also be one iteration directory: that one or
    none. Nothing is deleted. Collective when distributed: every rank verifies its share of the
    files and all get the same answer. Raises NoUsableCheckpoint when none verifies."""
    root = Path(root)
    if not (root / LATEST_FILE).is_file() and (root / METADATA_FILE).is_file():
        record = read_checkpoint_record(root)
        problem = check_usable(root, record.files)
        if problem:
            raise NoUsableCheckpoint(f"{root}: not usable: {problem}")
        return record, []
    skipped: List[str] = []
    complete = list(reversed(list_checkpoints(root)))
    try:
        latest = resolve_iteration(root)
        candidates = [latest] + [it for it in complete if it < latest]
    except CheckpointError as exc:  # an unreadable `latest`: every complete checkpoint, newest first
        skipped.append(str(exc))
        candidates = complete
    for iteration in candidates:
        path = iteration_dir(root, iteration)
        try:
            record = read_checkpoint_record(path)
        except CheckpointError as exc:
            skipped.append(f"iteration {iteration}: {exc}")
            continue
        problem = check_usable(path, record.files)
        if problem is None:
            return record, skipped
        skipped.append(f"iteration {iteration}: {problem}")
    raise NoUsableCheckpoint(f"no usable checkpoint in {root}: " + "; ".join(skipped or ["none complete"]))
