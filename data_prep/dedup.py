"""Exact and near-duplicate removal and benchmark decontamination for a stage of the data plan.

Three steps, each resumable and each a separate SLURM job when the plan runs as an array
(docs/data_quality.md has the user's view):

1. signatures (per shard, in parallel: pool workers locally, a slice of the shards per array task):
   for every document that the tokenizer would read, its id (stage, source, input piece, line),
   its exact-duplicate hash (data_prep.minhash.exact_hash), its MinHash LSH band keys and its
   benchmark n-gram hits.  Written to <stage>/dedup/sig/<member>/shard-NNNNN.* with each band's keys
   sorted, under temporary names; the shard's .json, written last, marks it complete.
2. merge (units in parallel; `--dedup-merge`, itself an array over the units): the hash space is cut
   into P ranges, P growing with the corpus so that one unit holds about `partition_docs` entries;
   a unit reads its range from every shard's sorted file (memory-mapped, binary search), sorts it
   and writes the pairs it finds (exact: duplicate -> first copy; near: first document of a shared
   bucket -> each other).  No process ever holds the whole corpus.
3. clusters (one process, memory ~ the number of duplicates, not of documents): the near pairs'
   connected components; in each, the document that comes first in plan order (stage, source,
   file, line) is kept, every other one of this stage is dropped as a duplicate of it.  An exact
   copy is dropped as a duplicate of its first copy.  Decontamination drops (or only reports) the
   documents sharing an n-gram with a benchmark example.  Results: <stage>/dedup/drops.npz, the
   human report <stage>/dedup_report.json and <stage>/<source>.dropped.jsonl.

The tokenizer pass then skips the dropped documents (DropFilter: the workers leave them out before
tokenizing) and counts them in each source's manifest under "removed".  Everything is a function of
the inputs and the settings, never of worker count, array split or interruptions.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
from typing import Dict, List, Optional, Tuple

import numpy as np

from megafox.runtime.fs import atomic_write_bytes, atomic_write_json

from .common import DataPrepError, detect_format, expand_inputs, file_stat, log, read_json
from .decontaminate import BenchmarkIndex, load_or_build
from .minhash import MinHasher, band_keys, exact_hash, lsh_params, ngrams_many, word_hashes_many
from .engine import Codec, ShardWriter, array_slice, group_pieces, plan_pieces, spill_result
from .readers import FileReader, parse_chunk
from .text_codec import WORKER as _W, encode_texts

EXACT, NEAR, CONTAMINATED, REPORTED = 1, 2, 3, 4
REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate", CONTAMINATED: "contaminated",
           REPORTED: "contaminated_reported"}
SIG_VERSION = 1

# document id: plan order packed in a uint64, so sorting ids is sorting by first occurrence
STAGE_BITS, SOURCE_BITS, PIECE_BITS, LINE_BITS = 6, 8, 20, 30
_LINE_SHIFT, _PIECE_SHIFT = 0, LINE_BITS
_SOURCE_SHIFT = LINE_BITS + PIECE_BITS
_STAGE_SHIFT = _SOURCE_SHIFT + SOURCE_BITS

DEDUP_KEYS = ("exact", "near", "threshold", "ngram", "num_perm", "across_stages", "partition_docs")
DECONTAM_KEYS = ("data_dir", "suite", "tasks", "ngram", "action")


# ---------------------------------------------------------------------------------------
# Plan sections


def dedup_settings(raw, where: str, err) -> Optional[dict]:
    """A stage's `dedup:` section (absent / false: off; true: the defaults)."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise err(f"{where}: must be true/false or a mapping with {', '.join(DEDUP_KEYS)}")
    extra = sorted(set(raw) - set(DEDUP_KEYS))
    if extra:
        raise err(f"{where}: unknown field(s) {', '.join(extra)} (allowed: {', '.join(DEDUP_KEYS)})")
    out = {"exact": raw.get("exact", True), "near": raw.get("near", True), "across_stages": raw.get("across_stages", False)}
    for k in ("exact", "near", "across_stages"):
        if not isinstance(out[k], bool):
            raise err(f"{where}.{k}: must be true or false")
    th = raw.get("threshold", 0.8)
    if isinstance(th, bool) or not isinstance(th, (int, float)) or not 0 < th < 1:
        raise err(f"{where}.threshold: must be a Jaccard similarity between 0 and 1, got {th!r}")
    for k, default, lo, hi in (("ngram", 5, 1, 64), ("num_perm", 128, 8, 1024), ("partition_docs", 1 << 24, 1, 1 << 40)):
        v = raw.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise err(f"{where}.{k}: must be a whole number in [{lo}, {hi}], got {v!r}")
        out[k] = v
    out["threshold"] = float(th)
    if not (out["exact"] or out["near"]):
        raise err(f"{where}: exact and near are both false; remove the section to turn dedup off")
    if out["near"]:
        out["bands"], out["rows"] = lsh_params(out["threshold"], out["num_perm"], fp_weight=0.3, fn_weight=0.7)
    return out


def decontam_settings(raw, where: str, err, expand) -> Optional[dict]:
    if raw is None or raw is False:
        return None
    if not isinstance(raw, dict):
        raise err(f"{where}: must be a mapping with {', '.join(DECONTAM_KEYS)}")
    extra = sorted(set(raw) - set(DECONTAM_KEYS))
    if extra:
        raise err(f"{where}: unknown field(s) {', '.join(extra)} (allowed: {', '.join(DECONTAM_KEYS)})")
    suite = raw.get("suite")
    if suite is not None and not isinstance(suite, str):
        raise err(f"{where}.suite: must be a suite name such as fox1")
    tasks = raw.get("tasks", [])
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise err(f"{where}.tasks: must be a list of lm_eval task names or task YAML files")
    if not suite and not tasks:
        raise err(f"{where}: name the benchmarks: suite (e.g. fox1) and/or tasks")
    tasks = [os.path.abspath(expand(t)) if t.endswith((".yaml", ".yml")) else t for t in tasks]
    data_dir = raw.get("data_dir")
    if data_dir is not None:
        if not isinstance(data_dir, str) or not data_dir:
            raise err(f"{where}.data_dir: must be the directory `megafox eval --data-dir` reads")
        data_dir = os.path.abspath(expand(data_dir))
    n = raw.get("ngram", 13)
    if isinstance(n, bool) or not isinstance(n, int) or not 4 <= n <= 64:
        raise err(f"{where}.ngram: must be a whole number in [4, 64], got {n!r}")
    action = raw.get("action", "drop")
    if action not in ("drop", "report"):
        raise err(f"{where}.action: must be drop or report, got {action!r}")
    return {"data_dir": data_dir, "suite": suite, "tasks": tasks, "ngram": n, "action": action}


def enabled(plan: dict, stage: str) -> bool:
    st = plan["stages"][stage]
    return bool(st.get("dedup") or st.get("decontaminate"))


# ---------------------------------------------------------------------------------------
# Members: the sources whose documents take part in a stage's dedup


def make_gid(stage_i: int, source_i: int, piece_i: int, line: int) -> int:
    return (stage_i << _STAGE_SHIFT) | (source_i << _SOURCE_SHIFT) | (piece_i << _PIECE_SHIFT) | line


def split_gid(g):
    g = np.asarray(g, np.uint64)
    m = lambda bits: np.uint64((1 << bits) - 1)  # noqa: E731
    return ((g >> np.uint64(_STAGE_SHIFT)) & m(STAGE_BITS), (g >> np.uint64(_SOURCE_SHIFT)) & m(SOURCE_BITS),
            (g >> np.uint64(_PIECE_SHIFT)) & m(PIECE_BITS), g & m(LINE_BITS))


class Member:
    """One source of this stage, or (across_stages) of an earlier one: its shards as the tokenizer cuts them."""

    def __init__(self, plan: dict, stage_i: int, stage: str, src_i: int, src: dict):
        self.stage_i, self.stage, self.src_i, self.src = stage_i, stage, src_i, src
        self.key = f"{stage}.{src['name']}"
        try:
            inputs = expand_inputs(src["globs"], what="glob")
        except DataPrepError as e:
            raise DataPrepError(f"{plan['path']}: {src['where'].split(': ', 1)[-1]}.globs: {e}") from None
        self.fmts = {f: detect_format(f, src["format"]) for f in inputs}
        groups = group_pieces(plan_pieces(inputs, self.fmts, plan["preprocess"]["shards"]), plan["preprocess"]["shards"])
        self.pieces = [p for g in groups for p in g]
        if len(self.pieces) >= 1 << PIECE_BITS or src_i >= 1 << SOURCE_BITS or stage_i >= 1 << STAGE_BITS:
            raise DataPrepError(f"{plan['path']}: stages.{stage}: dedup numbers documents by (stage < 64, source < 256, "
                                f"input piece < {1 << PIECE_BITS}); {src['name']} has {len(self.pieces)} pieces")
        self.shards: List[List[Tuple[int, object]]] = []
        i = 0
        for g in groups:
            self.shards.append([(i + k, p) for k, p in enumerate(g)])
            i += len(g)
        self.piece_index = {p: k for k, p in enumerate(self.pieces)}

    def shard_signature(self, shard: List[Tuple[int, object]], settings_sig: dict) -> dict:
        files = []
        for _, p in shard:
            st = file_stat(p.path)
            files.append([p.path, st["size"], st["mtime_ns"]] + ([p.start, p.end] if p.is_range else []))
        return {"version": SIG_VERSION, "member": self.key, "json_key": self.src["json_key"],
                "format": self.src["format"], "files": files, "settings": settings_sig}


def stage_members(plan: dict, stage: str) -> Tuple[List[Member], List[Member]]:
    """(this stage's sources, all members in plan order: earlier stages' first when across_stages)."""
    names = list(plan["stages"])
    si = names.index(stage)
    own = [Member(plan, si, stage, i, s) for i, s in enumerate(plan["stages"][stage]["sources"])]
    dd = plan["stages"][stage].get("dedup") or {}
    earlier = []
    if dd.get("across_stages"):
        for j, other in enumerate(names[:si]):
            if plan["stages"][other]["kind"] == "pretrain":
                earlier += [Member(plan, j, other, i, s) for i, s in enumerate(plan["stages"][other]["sources"])]
    return own, earlier + own


# ---------------------------------------------------------------------------------------
# Step 1: signatures (worker side)

_S: Dict[str, object] = {}


def _sig_init(settings: dict, index_path: Optional[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool (see preprocess)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _sig_setup(settings, index_path)


def _sig_setup(settings: dict, index_path: Optional[str]) -> None:
    dd = settings.get("dedup") or {}
    _S.update(dd=dd, hasher=MinHasher(dd["num_perm"]) if dd.get("near") else None,
              index=BenchmarkIndex.load(index_path) if index_path else None)


def _save_npy(path: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _sig_shard(job: tuple) -> Tuple[str, int, int]:
    """Fingerprints of one shard -> its files; returns (member key, shard index, documents)."""
    key, shard_i, pieces, stage_i, src_i, json_key, chunk_bytes, base, sig = job
    dd, hasher, index = _S["dd"], _S["hasher"], _S["index"]
    ids: List[int] = []
    hashes: List[Tuple[int, int]] = []
    sigs: List[np.ndarray] = []
    contam: List[Tuple[int, int, int]] = []
    for piece_i, piece, fmt in pieces:
        reader = FileReader(piece.path, fmt, json_key, chunk_bytes, piece.start, piece.end)
        for ch in reader.chunks():
            if ch[0] == "skip":
                continue
            texts, lines, _ = parse_chunk(ch, json_key)
            if not texts:
                continue
            if lines[-1] >= 1 << LINE_BITS:
                raise DataPrepError(f"{piece.path}: more than {1 << LINE_BITS} lines in one input piece; "
                                    f"set preprocess.shards to cut it into byte ranges")
            base_id = len(ids)
            ids.extend(make_gid(stage_i, src_i, piece_i, line) for line in lines)
            lowered = [t.lower() for t in texts]
            hashes.extend(exact_hash(t, low) for t, low in zip(texts, lowered))
            if hasher is not None or index is not None:
                wh, counts = word_hashes_many(lowered)
                if hasher is not None:
                    g, d = ngrams_many(wh, counts, dd["ngram"])
                    sigs.append(hasher.signatures(g, d, len(texts)))
                if index is not None:
                    contam.extend((ids[base_id + d], t, e) for d, t, e in index.hits_many(wh, counts))
    n = len(ids)
    gid = np.array(ids, np.uint64)
    prefix = os.path.join(base, f"shard-{shard_i:05d}")
    if n:
        hl = np.array(hashes, np.uint64).reshape(n, 2)
    else:
        hl = np.zeros((0, 2), np.uint64)
    order = np.lexsort((gid, hl[:, 1], hl[:, 0]))
    _save_npy(prefix + ".exact.npy", np.stack([hl[order, 0], hl[order, 1], gid[order]]))
    if hasher is not None:
        allsig = np.concatenate(sigs) if sigs else np.zeros((0, dd["num_perm"]), np.uint32)
        keys = band_keys(allsig, dd["bands"], dd["rows"]).T
        order = np.lexsort((np.broadcast_to(gid, keys.shape), keys), axis=-1) if n else np.zeros(keys.shape, np.int64)
        _save_npy(prefix + ".bkeys.npy", np.take_along_axis(keys, order, axis=1))
        _save_npy(prefix + ".bids.npy", np.take_along_axis(np.broadcast_to(gid, keys.shape), order, axis=1))
    _save_npy(prefix + ".contam.npy", np.array(contam, np.uint64).reshape(len(contam), 3))
    atomic_write_json(prefix + ".json", {"signature": sig, "documents": n})  # last: marks it complete
    return key, shard_i, n


# ---------------------------------------------------------------------------------------
# The stage's state (main process)


class StageDedup:
    def __init__(self, plan: dict, stage: str, quiet: bool = False):
        self.plan, self.stage, self.quiet = plan, stage, quiet
        st = plan["stages"][stage]
        self.dd, self.dc = st.get("dedup"), st.get("decontaminate")
        self.dir = os.path.join(plan["output_dir"], stage, "dedup")
        self.own, self.members = stage_members(plan, stage)
        self.index_path = os.path.join(self.dir, "benchmarks.npz") if self.dc else None
        self.index = None
        if self.dc:
            os.makedirs(self.dir, exist_ok=True)
            try:
                self.index = load_or_build(self.index_path, self.dc)
            except DataPrepError as e:  # name the plan and the section the benchmarks come from
                msg = str(e).removeprefix("decontaminate: ")
                raise DataPrepError(f"{plan['path']}: stages.{stage}.decontaminate: {msg}") from None
        self.settings = {"dedup": self.dd, "decontaminate": self.dc}
        self.settings_sig = {"dedup": self.dd, "decontaminate": dict(self.dc, index=self.index.digest()) if self.dc else None}
        self.jobs = []  # (member, shard index, signature)
        for m in self.members:
            for k, shard in enumerate(m.shards):
                self.jobs.append((m, k, m.shard_signature(shard, self.settings_sig)))
        self.signature = {"settings": self.settings_sig, "shards": [sig for _, _, sig in self.jobs]}

    def sig_prefix(self, m: Member, k: int) -> str:
        return os.path.join(self.dir, "sig", m.key, f"shard-{k:05d}")

    def _sig_done(self, m: Member, k: int, sig: dict) -> Optional[int]:
        p = self.sig_prefix(m, k)
        try:
            meta = read_json(p + ".json")
        except (OSError, ValueError):
            return None
        if meta.get("signature") != sig:
            return None
        need = [".exact.npy", ".contam.npy"] + ([".bkeys.npy", ".bids.npy"] if self.dd and self.dd["near"] else [])
        return meta["documents"] if all(os.path.exists(p + s) for s in need) else None

    # -- step 1 ------------------------------------------------------------------------
    def signatures(self, workers: int, array_index=None, array_count=None) -> int:
        jobs = self.jobs
        if array_count is not None:
            jobs = [jobs[i] for i in array_slice(len(jobs), array_index, array_count)]
        pending = []
        for m, k, sig in jobs:
            if self._sig_done(m, k, sig) is None:
                base = os.path.dirname(self.sig_prefix(m, k))
                os.makedirs(base, exist_ok=True)
                _clear_temporaries(base, f"shard-{k:05d}.")  # a killed writer's; this shard is ours
                pieces = [(i, p, m.fmts[p.path]) for i, p in m.shards[k]]
                chunk = int(self.plan["preprocess"]["chunk_mb"] * (1 << 20))
                pending.append((m.key, k, pieces, m.stage_i, m.src_i, m.src["json_key"], chunk, base, sig))
        if not pending:
            return 0
        if not self.quiet:
            log.info("%s: dedup signatures of %d shards (%d already done)", self.stage, len(pending),
                     len(jobs) - len(pending))
        _run_pool(_sig_shard, pending, workers, _sig_init, (self.settings, self.index_path))
        return len(pending)

    def signatures_complete(self) -> bool:
        return all(self._sig_done(m, k, sig) is not None for m, k, sig in self.jobs)

    # -- step 2 ------------------------------------------------------------------------
    def _merge_meta(self) -> dict:
        docs = sum(read_json(self.sig_prefix(m, k) + ".json")["documents"] for m, k, _ in self.jobs)
        bits = max(0, int(np.ceil(np.log2(max(docs, 1) / self.dd["partition_docs"])))) if self.dd else 0
        return {"signature": _digest(self.signature), "documents": docs, "partition_bits": min(bits, 16)}

    def units(self, meta: dict) -> List[Tuple[str, int, int]]:
        if not self.dd:
            return []
        P = 1 << meta["partition_bits"]
        out = [("exact", 0, p) for p in range(P)] if self.dd["exact"] else []
        if self.dd["near"]:
            out += [("near", b, p) for b in range(self.dd["bands"]) for p in range(P)]
        return out

    def _unit_path(self, u) -> str:
        return os.path.join(self.dir, "units", f"{u[0]}-b{u[1]:03d}-p{u[2]:05d}.npy")

    def _prepare_merge(self) -> dict:
        if not self.signatures_complete():
            missing = sum(self._sig_done(m, k, s) is None for m, k, s in self.jobs)
            raise DataPrepError(f"stage {self.stage}: {missing} of {len(self.jobs)} shards have no dedup signatures yet "
                                f"(under {self.dir}/sig/); run the signature step (the array tasks) first")
        meta = self._merge_meta()
        p = os.path.join(self.dir, "units", "merge.json")
        try:
            old = read_json(p)
        except (OSError, ValueError):
            old = None
        if old != meta:  # other inputs or settings: the old pairs mean nothing
            shutil.rmtree(os.path.join(self.dir, "units"), ignore_errors=True)
            atomic_write_json(p, meta)
        return meta

    def merge(self, workers: int, array_index=None, array_count=None) -> None:
        meta = self._prepare_merge()
        units = self.units(meta)
        if array_count is not None:
            units = [units[i] for i in array_slice(len(units), array_index, array_count)]
        pending = [u for u in units if not os.path.exists(self._unit_path(u))]
        if not pending:
            return
        for u in pending:
            _clear_temporaries(os.path.dirname(self._unit_path(u)), os.path.basename(self._unit_path(u)))
        shard_files = [self.sig_prefix(m, k) for m, k, _ in self.jobs]
        if not self.quiet:
            log.info("%s: dedup merge of %d buckets (%d partitions of the hash space)", self.stage, len(pending),
                     1 << meta["partition_bits"])
        _run_pool(_merge_unit, [(u, meta["partition_bits"], shard_files, self._unit_path(u)) for u in pending],
                  workers, _plain_init, ())

    # -- step 3 ------------------------------------------------------------------------
    def state_path(self) -> str:
        return os.path.join(self.dir, "drops.json")

    def complete(self) -> bool:
        try:
            st = read_json(self.state_path())
        except (OSError, ValueError):
            return False
        return st.get("signature") == _digest(self.signature) and os.path.exists(os.path.join(self.dir, "drops.npz"))

    def cluster(self) -> dict:
        meta = self._prepare_merge()
        units = self.units(meta)
        missing = [u for u in units if not os.path.exists(self._unit_path(u))]
        if missing:
            raise DataPrepError(f"stage {self.stage}: {len(missing)} of {len(units)} dedup buckets are not merged "
                                f"(e.g. {self._unit_path(missing[0])}); run the merge step (--dedup-merge) first")
        own_stage = self.own[0].stage_i
        drop: Dict[str, np.ndarray] = {}
        pairs = [np.load(self._unit_path(u)) for u in units if u[0] == "exact"]
        ex = np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), np.uint64)
        edges = [np.load(self._unit_path(u)) for u in units if u[0] == "near"]
        ed = np.unique(np.concatenate(edges, axis=1), axis=1) if edges else np.zeros((2, 0), np.uint64)
        gids, reasons, refs = [ex[0]], [np.full(ex.shape[1], EXACT, np.uint8)], [ex[1]]
        if ed.shape[1]:
            nodes, roots = components(ed)
            nonroot = nodes != roots
            gids.append(nodes[nonroot])
            reasons.append(np.full(int(nonroot.sum()), NEAR, np.uint8))
            refs.append(roots[nonroot])
        g, r, ref = np.concatenate(gids), np.concatenate(reasons), np.concatenate(refs)
        mine = split_gid(g)[0] == own_stage
        g, r, ref = g[mine], r[mine], ref[mine]
        order = np.lexsort((r, g))  # an exact copy is also near: the exact reason wins
        g, r, ref = g[order], r[order], ref[order]
        first = np.ones(len(g), bool)
        first[1:] = g[1:] != g[:-1]
        g, r, ref = g[first], r[first], ref[first]
        # decontamination
        hits = [np.load(self.sig_prefix(m, k) + ".contam.npy") for m, k, _ in self.jobs if m.stage_i == own_stage]
        hits = np.concatenate(hits) if hits else np.zeros((0, 3), np.uint64)
        if len(hits):
            cg = np.unique(hits[:, 0])
            new = cg[~np.isin(cg, g)]
            action = CONTAMINATED if self.dc["action"] == "drop" else REPORTED
            g = np.concatenate([g, new])
            r = np.concatenate([r, np.full(len(new), action, np.uint8)])
            ref = np.concatenate([ref, np.zeros(len(new), np.uint64)])
            order = np.argsort(g, kind="stable")
            g, r, ref = g[order], r[order], ref[order]
        buf_path = os.path.join(self.dir, "drops.npz")
        buf = io.BytesIO()
        np.savez(buf, gid=g, reason=r, ref=ref)
        atomic_write_bytes(buf_path, buf.getvalue())
        report = self._report(g, r, ref, hits, meta)
        atomic_write_json(self.state_path(), {"signature": _digest(self.signature), "counts": report["sources"]})
        return report

    def _where(self, gid: int) -> dict:
        st, so, pi, ln = (int(x) for x in split_gid(gid))
        m = next(x for x in self.members if x.stage_i == st and x.src_i == so)
        p = m.pieces[pi]
        out = {"source": m.key, "file": p.path, "line": ln}
        if p.is_range:
            out["from_byte"] = p.start
        return out

    def _report(self, g, r, ref, hits, meta) -> dict:
        docs = collections.Counter()
        for m, k, _ in self.jobs:
            if m in self.own:
                docs[m.src["name"]] += read_json(self.sig_prefix(m, k) + ".json")["documents"]
        _, so, _, _ = split_gid(g)
        sources = {}
        for m in self.own:
            sel = so == m.src_i
            c = collections.Counter(r[sel].tolist())
            sources[m.src["name"]] = {"documents_read": docs[m.src["name"]],
                                      **{REASONS[k]: int(c.get(k, 0)) for k in REASONS}}
        bench = {}
        if self.index is not None:
            for t, name in enumerate(self.index.names):
                sel = hits[:, 1] == t if len(hits) else np.zeros(0, bool)
                bench[name] = {"documents": int(len(np.unique(hits[sel, 0]))) if len(hits) else 0,
                               "examples_found": int(len(np.unique(hits[sel, 2]))) if len(hits) else 0,
                               "examples": self.index.examples[t],
                               "examples_too_short": self.index.short[t]}
        report = {"stage": self.stage, "settings": self.settings, "documents": meta["documents"],
                  "sources": sources, "benchmarks": bench,
                  "dropped_lists": {m.src["name"]: f"{m.src['name']}.dropped.jsonl" for m in self.own}}
        out_dir = os.path.join(self.plan["output_dir"], self.stage)
        atomic_write_json(os.path.join(out_dir, "dedup_report.json"), report)
        by_doc = collections.defaultdict(list)
        for row in hits.tolist():
            by_doc[row[0]].append({"task": self.index.names[row[1]], "example": row[2]})
        for m in self.own:
            sel = np.nonzero(so == m.src_i)[0]
            lines = []
            for i in sel.tolist():
                rec = dict(self._where(int(g[i])), reason=REASONS[int(r[i])])
                del rec["source"]
                if r[i] in (EXACT, NEAR):
                    rec["duplicate_of"] = self._where(int(ref[i]))
                if int(g[i]) in by_doc:
                    rec["benchmarks"] = by_doc[int(g[i])]
                lines.append(json.dumps(rec))
            atomic_write_bytes(os.path.join(out_dir, f"{m.src['name']}.dropped.jsonl"),
                               ("\n".join(lines) + ("\n" if lines else "")).encode())
        return report

    def filters(self) -> Dict[str, "DropFilter"]:
        with np.load(os.path.join(self.dir, "drops.npz")) as z:
            g, r = z["gid"], z["reason"]
        _, so, pi, ln = split_gid(g)
        out = {}
        for m in self.own:
            sel = so == m.src_i
            out[m.src["name"]] = DropFilter(m, pi[sel], ln[sel], r[sel])
        return out

    def counts(self) -> dict:
        return read_json(self.state_path())["counts"]


def _clear_temporaries(directory: str, name: str) -> None:
    """atomic_write_bytes's leftovers (.NAME....tmp) of a writer killed while writing `name`*."""
    for p in glob.glob(os.path.join(glob.escape(directory), "." + glob.escape(name) + "*.tmp")):
        try:
            os.unlink(p)
        except OSError:
            pass


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Step 2: one bucket unit (worker side)


def _plain_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _merge_unit(job) -> str:
    (kind, band, part), bits, shard_files, out = job
    lo_key = np.uint64(part << (64 - bits)) if bits else np.uint64(0)
    keys, ids, los = [], [], []
    for prefix in shard_files:
        if kind == "exact":
            a = np.load(prefix + ".exact.npy", mmap_mode="r")
            k, second, gid = a[0], a[1], a[2]
        else:
            k = np.load(prefix + ".bkeys.npy", mmap_mode="r")[band]
            gid = np.load(prefix + ".bids.npy", mmap_mode="r")[band]
            second = None
        if bits:
            i = np.searchsorted(k, lo_key, "left")
            j = np.searchsorted(k, np.uint64(((part + 1) << (64 - bits)) - 1), "right") if part + 1 < 1 << bits else len(k)
        else:
            i, j = 0, len(k)
        keys.append(np.array(k[i:j]))
        ids.append(np.array(gid[i:j]))
        if second is not None:
            los.append(np.array(second[i:j]))
    k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    gid = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
    lo = np.concatenate(los) if los else np.zeros(len(k), np.uint64)
    order = np.lexsort((gid, lo, k))
    k, lo, gid = k[order], lo[order], gid[order]
    same = np.zeros(len(k), bool)
    same[1:] = (k[1:] == k[:-1]) & (lo[1:] == lo[:-1])
    start = np.maximum.accumulate(np.where(same, 0, np.arange(len(k))))
    pairs = np.stack([gid[same], gid[start[same]]]) if kind == "exact" else np.stack([gid[start[same]], gid[same]])
    _save_npy(out, pairs.astype(np.uint64))
    return out


def components(edges: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Connected components of an undirected graph given as a (2, m) array of node ids: every node
    and the smallest id of its component (min-label propagation with pointer jumping)."""
    nodes, inv = np.unique(edges.ravel(), return_inverse=True)
    m = edges.shape[1]
    u, v = inv[:m], inv[m:]
    lab = np.arange(len(nodes))
    while True:
        low = np.minimum(lab[u], lab[v])
        new = lab.copy()
        np.minimum.at(new, u, low)
        np.minimum.at(new, v, low)
        while True:  # labels point at a smaller node of the same component: follow them down
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, lab):
            return nodes, nodes[lab]
        lab = new


# ---------------------------------------------------------------------------------------
# Pool


def _run_pool(fn, jobs: list, workers: int, init, init_args: tuple) -> list:
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        if init is _sig_init:
            _sig_setup(*init_args)
        return [fn(j) for j in jobs]
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # as the engine: no Ctrl-C mid-fork
    try:
        pool = ctx.Pool(workers, initializer=init, initargs=init_args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    try:
        out = list(pool.imap_unordered(fn, jobs))
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()
    return out


# ---------------------------------------------------------------------------------------
# Tokenizer pass: leave the dropped documents out


class DropFilter:
    """The dropped (and reported) lines of one source, by input piece; wraps preprocess's codec."""

    def __init__(self, member: Member, pieces: np.ndarray, lines: np.ndarray, reasons: np.ndarray):
        self.piece_index = member.piece_index
        self.by_piece: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        for p in np.unique(pieces).tolist():
            sel = pieces == p
            self.by_piece[int(p)] = (lines[sel].astype(np.int64), reasons[sel])
        h = hashlib.sha256()
        for a in (pieces, lines, reasons):
            h.update(np.ascontiguousarray(a).tobytes())
        self.digest = h.hexdigest()[:32]

    def codec(self, base):
        def reader(piece, fmt, chunk_bytes):
            return _FilteringReader(base.reader(piece, fmt, chunk_bytes),
                                    self.by_piece.get(self.piece_index.get(piece), None))

        return Codec(base.init, base.init_args, _encode_filtered, _encode_filtered_spill, reader, FilteredShardWriter)


class _FilteringReader:
    """A FileReader whose chunks carry the (line, reason) pairs of theirs to leave out."""

    def __init__(self, inner, drops):
        self.inner, self.drops = inner, drops

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name in ("inner", "drops"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def chunks(self):
        for ch in self.inner.chunks():
            if ch[0] == "skip" or self.drops is None:
                yield ch
                continue
            kind, data, first = ch
            n = data.count(b"\n") + 1 if kind == "lines" else (len(data) if kind == "list" else 1)
            lines, reasons = self.drops
            i, j = np.searchsorted(lines, first), np.searchsorted(lines, first + n)
            yield ch + (tuple(zip(lines[i:j].tolist(), reasons[i:j].tolist())),) if j > i else ch


def _encode_filtered(chunk: tuple):
    drops = dict(chunk[3]) if len(chunk) > 3 else {}
    texts, lines, skips = parse_chunk(chunk[:3], _W["key"])
    removed = collections.Counter()
    if drops:
        kt, kl = [], []
        for t, ln in zip(texts, lines):
            reason = drops.get(ln)
            if reason is not None:
                removed[REASONS[reason]] += 1
                if reason != REPORTED:
                    continue
            kt.append(t)
            kl.append(ln)
        texts, lines = kt, kl
    return encode_texts(texts, lines, skips) + (dict(removed),)


def _encode_filtered_spill(chunk: tuple):
    return spill_result(_encode_filtered(chunk))


class FilteredShardWriter(ShardWriter):
    """A shard writer that also counts what the workers left out (the shard record's "removed")."""

    def __init__(self, shard, dtype):
        super().__init__(shard, dtype)
        self.removed = collections.Counter({v: 0 for v in REASONS.values()})

    def add(self, piece, result):
        self.removed.update(result[4])
        return super().add(piece, result[:4])

    def extra_meta(self) -> dict:
        return {"removed": dict(sorted(self.removed.items()))}


# ---------------------------------------------------------------------------------------
# Driver (data_prep.plan)


def run_stage(plan: dict, stage: str, workers: int, array_index=None, array_count=None, finalize=False,
              merge_only=False, quiet=False) -> Optional[Dict[str, DropFilter]]:
    """The stage's drop filters, computing what is missing; None when this call's part is done but
    the filters need other jobs first (an array task's signatures; a merge array task)."""
    sd = StageDedup(plan, stage, quiet)
    if sd.complete():
        return None if merge_only else sd.filters()
    if merge_only:  # `--dedup-merge`: step 2 (all units, or an array task's), then step 3
        sd.merge(workers, array_index, array_count)
        if array_count is None:
            _announce(sd.cluster(), quiet)
        return None
    if array_count is not None:
        sd.signatures(workers, array_index, array_count)
        return None
    if finalize:
        raise DataPrepError(f"stage {stage}: dedup is not finished; run the array tasks, then --dedup-merge, then "
                            f"the array tasks again (they tokenize what is kept), before --finalize")
    sd.signatures(workers)
    sd.merge(workers)
    _announce(sd.cluster(), quiet)
    return sd.filters()


def _announce(report: dict, quiet: bool) -> None:
    if quiet:
        return
    for name, c in report["sources"].items():
        print(f"{report['stage']}/{name}: dedup read {c['documents_read']:,} documents: "
              f"{c['exact_duplicate']:,} exact and {c['near_duplicate']:,} near duplicates, "
              f"{c['contaminated'] + c['contaminated_reported']:,} contaminated"
              f"{' (reported, kept)' if c['contaminated_reported'] else ''}", flush=True)
    for name, b in report["benchmarks"].items():
        if b["documents"]:
            print(f"  {name}: {b['examples_found']} of {b['examples']} examples found in {b['documents']} documents",
                  flush=True)
