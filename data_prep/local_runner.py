"""Local data preparation: a process pool over volumes, then a deterministic finalise step
that writes the shards in parallel on the same pool.

Resumable by construction. Each worker writes a volume's records to `<out>/_work/<key>.array_record`
and then its manifest row to `<key>.json` (the commit marker), both atomically. A re-run reuses
every volume whose marker matches the file's sha256, the metadata and the preprocessing config,
and redoes the rest. Finalising always rebuilds the shards from the work files in input order,
so a run that was killed and resumed writes exactly the shards an uninterrupted run writes.
Each shard is one finalise task: it reads its records by index from the work files (the shard
rule in `shards` says which) and copies their bytes as they are, so finalising scales with the
workers instead of capping the pool at one process's speed.

After a successful run the work folder is removed (it is about 1.5 times the size of the
shards), unless `keep_work` asks to keep it for incremental runs over a growing corpus. Temp
files an interrupted run left (`.<name>.tmp-<pid>`) are removed when the next run starts.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from braindino_jax.data import manifest, records, shards
from braindino_jax.data.atomic_file import write_atomic
from braindino_jax.data.dataset_card import build_card, encode_card
from braindino_jax.data.inputs import InputSelection, InputVolume, find_duplicates, is_excluded
from braindino_jax.data.qc_montage import QcSampler
from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import ConfigError
from data_prep.summary import RunSummary
from data_prep.volume_task import base_row, file_sha256, prepare_volume, volume_key

WORK_DIR = "_work"
MANIFEST = "manifest.jsonl"
DATASET_CARD = "dataset_card.json"
QC_DIR = "qc"


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Everything a run needs besides its inputs; `validate` names the offending option."""

    out_dir: Path
    config: PrepConfig = PrepConfig()
    selection: InputSelection = InputSelection()
    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    shard_prefix: str = "slices"
    target_shard_records: int | None = None
    target_shard_bytes: int | None = 1_000_000_000
    max_failure_fraction: float = 0.2
    qc_per_dataset: int = 16
    qc_worst: int = 16
    seed: int = 0
    progress: bool = True
    keep_work: bool = False

    def validate(self) -> None:
        self.config.validate()
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError("workers", f"expected an integer >= 1, got {self.workers!r}")
        if not self.shard_prefix or any(c in self.shard_prefix for c in "/\\ "):
            raise ConfigError("shard_prefix", f"expected a plain file-name prefix, got {self.shard_prefix!r}")
        if (self.target_shard_records is None) == (self.target_shard_bytes is None):
            raise ConfigError("target_shard_records", "give exactly one shard-size target (records or bytes)")
        for name in ("target_shard_records", "target_shard_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(name, f"expected a size >= 1, got {value!r}")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ConfigError("max_failure_fraction", f"expected a number in [0, 1], got {self.max_failure_fraction!r}")
        for name in ("qc_per_dataset", "qc_worst"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"expected an integer >= 0, got {getattr(self, name)!r}")


def plan_tasks(
    volumes: Sequence[InputVolume], exclusions: set[str], selection: InputSelection = InputSelection()
) -> tuple[list[tuple[int, InputVolume]], list[dict]]:
    """Split the listing into (index, volume) tasks and rows for the files the selection skips,
    duplicates and excluded subjects."""
    tasks, skipped = [], []
    for index, (volume, first) in enumerate(zip(volumes, find_duplicates(volumes))):
        reason = selection.skip_reason(volume)
        if reason is not None:
            skipped.append(base_row(index, volume, manifest.SKIPPED, reason))
        elif first is not None:
            skipped.append(base_row(index, volume, manifest.DUPLICATE, f"same file as {first}, processed once"))
        elif is_excluded(volume, exclusions):
            skipped.append(base_row(index, volume, manifest.EXCLUDED, "subject is in the exclusion list"))
        else:
            tasks.append((index, volume))
    return tasks, skipped


def _work_paths(work_dir: Path, key: str) -> tuple[Path, Path]:
    return work_dir / f"{key}.array_record", work_dir / f"{key}.json"


def _identity(volume: InputVolume, config: PrepConfig, sha256: str) -> dict[str, Any]:
    """What a cached result must match to be reused (records embed all of it)."""
    return {
        "volume": dataclasses.asdict(volume),
        "sha256": sha256,
        "config": config.to_dict(),
        "schema_version": records.SCHEMA_VERSION,
    }


def process_cached(index: int, volume: InputVolume, config: PrepConfig, work_dir: Path) -> dict[str, Any]:
    """Reuse a finished volume's work files or prepare it; returns its manifest row."""
    start = time.perf_counter()
    rec_path, marker_path = _work_paths(work_dir, volume_key(volume.path))
    try:
        sha256 = file_sha256(volume.path)
    except OSError:
        sha256 = None  # prepare_volume turns the same error into a failed row
    hash_s = time.perf_counter() - start
    if sha256 is not None and marker_path.is_file() and rec_path.is_file():
        try:
            marker = json.loads(marker_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            marker = None
        if marker and marker.get("identity") == _identity(volume, config, sha256):
            row = marker["row"]
            row.update(index=index, reused=True)
            return row
    result = prepare_volume(index, volume, config, sha256=sha256)
    row = result.row
    row["timings"]["hash_s"] = hash_s
    if row["status"] == manifest.OK:
        t = time.perf_counter()
        shards.write_array_record(rec_path, result.records, shards.WORK_OPTIONS)
        write_atomic(marker_path, json.dumps({"identity": _identity(volume, config, row["sha256"]),
                                              "row": row}).encode())
        row["timings"]["write_s"] = time.perf_counter() - t
        row["timings"]["total_s"] = time.perf_counter() - start
    return row


class WorkerPool:
    """The spawn-context process pool both phases share, started on first use, replaced when a
    worker dies."""

    def __init__(self, workers: int):
        self.workers = workers
        self._executor: cf.ProcessPoolExecutor | None = None

    def get(self) -> cf.ProcessPoolExecutor:
        if self._executor is None:
            context = multiprocessing.get_context("spawn")  # no fork: the parent may hold JAX threads
            self._executor = cf.ProcessPoolExecutor(self.workers, mp_context=context)
        return self._executor

    def discard(self, wait: bool = True) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None


def _process_all(
    tasks: list[tuple[int, InputVolume]], options: RunOptions, work_dir: Path, pool: WorkerPool | None
) -> list[dict]:
    """Run `process_cached` over the tasks, in-process without a pool."""
    bar = tqdm(total=len(tasks), unit="vol", desc="preparing", disable=not options.progress, smoothing=0.1)
    rows = []
    try:
        if pool is None:
            for index, volume in tasks:
                rows.append(process_cached(index, volume, options.config, work_dir))
                bar.update()
            return rows
        pending = list(reversed(tasks))
        window = 4 * pool.workers
        while pending:
            executor = pool.get()
            in_flight: dict[cf.Future, tuple[int, InputVolume]] = {}
            try:
                while pending or in_flight:
                    while pending and len(in_flight) < window:
                        index, volume = pending.pop()
                        future = executor.submit(process_cached, index, volume, options.config, work_dir)
                        in_flight[future] = (index, volume)
                    done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                    for future in done:
                        rows.append(future.result())
                        del in_flight[future]
                        bar.update()
            except cf.process.BrokenProcessPool:
                # A worker died (out of memory, a crash in a decoder). Volumes without a result
                # are recorded as failed (a re-run retries them); a fresh pool takes the rest.
                for future, (index, volume) in in_flight.items():
                    if future.done() and not future.cancelled() and future.exception() is None:
                        rows.append(future.result())
                    else:
                        rows.append(base_row(index, volume, manifest.FAILED,
                                             "worker process died while preparing this volume"))
                    bar.update()
                pool.discard()
            except BaseException:
                pool.discard(wait=False)
                raise
        return rows
    finally:
        bar.close()


SHARD_PLAN = "_shard_plan.json"


def write_shard(
    temp: Path, shard: int, n_shards: int, plan_file: Path, qc: tuple[int, int, int]
) -> tuple[int, QcSampler]:
    """One finalise task: copy shard `shard`'s records from the work files into `temp`, in order.

    `plan_file` (in the work folder) lists the good volumes in input order: their keys, input
    paths and record counts; `shards.shard_members` picks this shard's records from it. It is a
    file, read by each task, so that the main process sends each task a few arguments instead
    of the whole corpus listing. `qc` is the sampler's (per_dataset, worst, seed). Returns the
    number of records written and this shard's QC sample, to merge with the others.
    """
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    sampler = QcSampler(*qc)

    def records_in_order():
        for v, indices in shards.shard_members(shard, n_shards, plan["counts"]):
            key = plan["keys"][v]
            try:
                data = shards.read_array_record(_work_paths(plan_file.parent, key)[0], indices,
                                                expect=plan["counts"][v])
            except shards.ShardError as exc:
                raise shards.ShardError(f"work file for {plan['paths'][v]}: {exc}; delete it and re-run") from exc
            for j, record_bytes in zip(indices, data):
                sampler.observe(f"{key}/{j}", records.decode(record_bytes))
                yield record_bytes

    # `temp` is already the ShardSet's temp name: written in place, renamed by its commit.
    return shards.write_array_record(temp, records_in_order(), atomic=False), sampler


def _map_ordered(pool: WorkerPool | None, fn, arg_lists: list[tuple], bar: tqdm) -> list:
    """`[fn(*args) for args in arg_lists]`, on the pool when there is one; `bar` counts them."""
    if pool is None:
        out = []
        for args in arg_lists:
            out.append(fn(*args))
            bar.update()
        return out
    executor = pool.get()
    try:
        futures = [executor.submit(fn, *args) for args in arg_lists]
        for _ in cf.as_completed(futures):
            bar.update()
        return [f.result() for f in futures]
    except BaseException:
        pool.discard()  # cancel the queued tasks and let running ones finish before cleanup
        raise


def finalise(
    rows: list[dict], options: RunOptions, work_dir: Path, pool: WorkerPool | None = None
) -> dict[str, Any]:
    """Deal every good volume's records into balanced shards, one task per shard (on `pool`
    when given); then write manifest, card and QC."""
    out_dir = Path(options.out_dir)
    rows = sorted(rows, key=lambda r: r["index"])
    ok = [r for r in rows if r["status"] == manifest.OK]
    counts = [r["slices_kept"] for r in ok]
    total_records = sum(counts)
    sampler = QcSampler(options.qc_per_dataset, options.qc_worst, options.seed)
    shard_paths: list[Path] = []
    shard_counts: list[int] = []
    if total_records:
        n_shards = shards.count_shards(
            total_records,
            sum(r["record_bytes"] for r in ok),
            options.target_shard_records,
            options.target_shard_bytes,
        )
        plan_file = work_dir / SHARD_PLAN
        plan = {"keys": [r["key"] for r in ok], "paths": [r["path"] for r in ok], "counts": counts}
        write_atomic(plan_file, json.dumps(plan).encode())
        qc = (options.qc_per_dataset, options.qc_worst, options.seed)
        bar = tqdm(total=n_shards, unit="shard", desc="writing shards", disable=not options.progress)
        with bar, shards.ShardSet(out_dir, options.shard_prefix, n_shards) as shard_set:
            tasks = [(temp, s, n_shards, plan_file, qc) for s, temp in enumerate(shard_set.temps)]
            written = _map_ordered(pool, write_shard, tasks, bar)
            shard_paths = shard_set.commit()
        shard_counts = [n for n, _ in written]
        for _, part in written:
            sampler.merge(part)
    else:
        for stale in shards.find_shard_files(out_dir, options.shard_prefix):
            stale.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / MANIFEST, manifest.encode_manifest(rows))
    card = build_card(rows, options.config, [p.name for p in shard_paths], shard_counts)
    write_atomic(out_dir / DATASET_CARD, encode_card(card))
    qc_dir = out_dir / QC_DIR
    if qc_dir.is_dir():
        shutil.rmtree(qc_dir)
    qc_paths = sampler.write(qc_dir) if total_records else []
    return {"shards": shard_paths, "qc": qc_paths, "rows": rows}


_TEMP_NAME = re.compile(r"\..+(\.tmp-\d+)+")  # atomic_file.temp_name, possibly nested by older versions


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files and folders (`.<name>.tmp-<pid>`) that interrupted runs left in
    `folder`; returns what was removed."""
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if _TEMP_NAME.fullmatch(path.name):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                removed.append(path)
    return removed


def finished_volumes(out_dir: str | os.PathLike) -> int:
    """Volumes whose results are kept in `out_dir`'s work folder (a re-run reuses them)."""
    work_dir = Path(out_dir) / WORK_DIR
    return sum(1 for p in work_dir.glob("*.json") if not p.name.startswith("_")) if work_dir.is_dir() else 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_local(
    volumes: Sequence[InputVolume],
    options: RunOptions,
    exclusions: set[str] | None = None,
) -> RunSummary:
    """Prepare `volumes` into shards under `options.out_dir`; see the module docstring."""
    options.validate()
    start = time.perf_counter()
    work_dir = Path(options.out_dir) / WORK_DIR
    work_dir.mkdir(parents=True, exist_ok=True)
    for folder in (Path(options.out_dir), work_dir):
        remove_stale_temps(folder)
    tasks, skipped = plan_tasks(volumes, exclusions or set(), options.selection)
    pool = WorkerPool(options.workers) if options.workers > 1 else None
    try:
        rows = skipped + _process_all(tasks, options, work_dir, pool)
        result = finalise(rows, options, work_dir, pool)
    finally:
        if pool is not None:
            pool.discard()
    summary = RunSummary.from_rows(
        result["rows"],
        out_dir=Path(options.out_dir),
        shard_paths=result["shards"],
        shard_bytes=sum(p.stat().st_size for p in result["shards"]),
        qc_paths=result["qc"],
        seconds=time.perf_counter() - start,
    )
    succeeded = summary.exit_code(options.max_failure_fraction) == 0
    work_bytes = _folder_bytes(work_dir)
    if succeeded and not options.keep_work:
        shutil.rmtree(work_dir)
        summary.work = f"removed {work_dir} ({work_bytes / 1e6:.1f} MB; --keep-work keeps it for incremental runs)"
    else:
        why = "--keep-work" if succeeded else "the run failed: a re-run reuses the finished volumes"
        summary.work = f"kept {work_dir} ({work_bytes / 1e6:.1f} MB; {why})"
    return summary
