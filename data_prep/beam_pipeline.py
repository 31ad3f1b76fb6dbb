"""Apache Beam data preparation, for corpora too large for one machine (Dataflow, Flink, Spark).

The same per-volume function as the local runner, and the same slice-to-shard rule: volumes in
input order, record `j` of a volume starting at global offset `o` goes to shard `(o + j) % n`.
So for the same inputs and options both runners write identical shards. Outputs go through
Beam's file systems (local paths, gs://, s3://...); remote inputs are copied to a worker's
local disk before nibabel reads them. A Beam job is retried by its runner, not resumed: give
it an output folder without shards.

    python -m data_prep.beam_pipeline --csv gs://bucket/volumes.csv --out gs://bucket/shards \\
        --runner DataflowRunner --project P --region R --temp_location gs://bucket/tmp \\
        --setup_file ./setup.py
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from functools import reduce
from typing import Any, BinaryIO

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from braindino_jax.data import manifest, records, shards
from braindino_jax.data.atomic_file import temp_name
from braindino_jax.data.dataset_card import build_card, encode_card
from braindino_jax.data.inputs import InputError, InputVolume, is_url
from braindino_jax.data.qc_montage import QcSampler
from braindino_jax.preprocessing.errors import ConfigError
from data_prep.local_runner import DATASET_CARD, MANIFEST, QC_DIR, RunOptions, plan_tasks
from data_prep.options import build_parser, flag_error, inputs_from_args, options_from_args
from data_prep.summary import RunSummary
from data_prep.volume_task import VolumeResult, base_row, prepare_volume


def _publish(dest: str, source: BinaryIO) -> None:
    """Stream `source` to `dest` through Beam's file systems (temp name, then rename), so a
    gigabyte shard is copied in chunks rather than read into memory whole."""
    directory, name = dest.rsplit("/", 1) if "/" in dest else (".", dest)
    tmp = FileSystems.join(directory, temp_name(name))
    with FileSystems.create(tmp) as f:
        shutil.copyfileobj(source, f)
    FileSystems.rename([tmp], [dest])


def _prepare(task: tuple[int, InputVolume], options: RunOptions) -> VolumeResult:
    index, volume = task
    if not is_url(volume.path):
        return prepare_volume(index, volume, options.config)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, volume.path.rsplit("/", 1)[-1])
        try:
            # UNCOMPRESSED: the default would gunzip a .nii.gz by its name; nibabel wants the bytes.
            with FileSystems.open(volume.path, compression_type=CompressionTypes.UNCOMPRESSED) as src, \
                    open(local, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except Exception as exc:  # each remote file system raises its own error types
            return VolumeResult(base_row(index, volume, manifest.FAILED, f"cannot read file: {exc}"), [])
        return prepare_volume(index, volume, options.config, local_path=local)


def _shard_plan(counts: list[tuple[int, int, int]], options: RunOptions) -> dict[str, Any]:
    """From (index, records, bytes) of every good volume: shard count and each volume's offset."""
    counts = sorted(counts)
    total = sum(c[1] for c in counts)
    n_shards = shards.count_shards(
        total, sum(c[2] for c in counts), options.target_shard_records, options.target_shard_bytes
    ) if total else 0
    offsets = shards.record_offsets([c[1] for c in counts])
    return {
        "n_shards": n_shards,
        "offsets": {index: offset for (index, _, _), offset in zip(counts, offsets)},
        "per_shard": [len(range(s, total, n_shards)) for s in range(n_shards)],
    }


def _assign(result: VolumeResult, plan: dict[str, Any]) -> Iterator[tuple[int, tuple[int, int, bytes]]]:
    if result.row["status"] != manifest.OK:
        return
    offset = plan["offsets"][result.row["index"]]
    for j, data in enumerate(result.records):
        yield shards.shard_of(offset, j, plan["n_shards"]), (offset, j, data)


def _write_shard(item: tuple[int, Any], plan: dict[str, Any], out: str, prefix: str) -> str:
    shard, entries = item
    name = shards.shard_path("", prefix, shard, plan["n_shards"]).name
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        shards.write_array_record(local, (data for _, _, data in sorted(entries, key=lambda e: e[:2])))
        with open(local, "rb") as f:
            _publish(FileSystems.join(out, name), f)
    return name


class _QcCombine(beam.CombineFn):
    """Merges per-bundle QC samplers; the selection does not depend on the order of records."""

    def __init__(self, options: RunOptions):
        self._options = options

    def create_accumulator(self) -> QcSampler:
        return QcSampler(self._options.qc_per_dataset, self._options.qc_worst, self._options.seed)

    def add_input(self, sampler: QcSampler, item: tuple[str, bytes]) -> QcSampler:
        sampler.observe(item[0], records.decode(item[1]))
        return sampler

    def merge_accumulators(self, samplers) -> QcSampler:
        return reduce(QcSampler.merge, samplers)

    def extract_output(self, sampler: QcSampler) -> QcSampler:
        return sampler


def _write_qc(sampler: QcSampler, out: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        written = sampler.write(tmp)
        names = sorted(os.listdir(tmp))
        for name in names:
            with open(os.path.join(tmp, name), "rb") as f:
                _publish(FileSystems.join(out, QC_DIR, name), f)
    return [FileSystems.join(out, QC_DIR, p.name) for p in written]


def _write_reports(rows: list[dict], skipped: list[dict], plan: dict[str, Any], out: str,
                   options: RunOptions) -> None:
    rows = sorted(rows + skipped, key=lambda r: r["index"])
    _publish(FileSystems.join(out, MANIFEST), io.BytesIO(manifest.encode_manifest(rows)))
    names = [shards.shard_path("", options.shard_prefix, s, plan["n_shards"]).name
             for s in range(plan["n_shards"])]
    card = build_card(rows, options.config, names, plan["per_shard"])
    _publish(FileSystems.join(out, DATASET_CARD), io.BytesIO(encode_card(card)))


def build_pipeline(
    pipeline: beam.Pipeline,
    volumes: Sequence[InputVolume],
    options: RunOptions,
    out: str,
    exclusions: set[str] | None = None,
) -> None:
    """Add the preparation of `volumes` into shards under `out` to `pipeline`."""
    options.validate()
    pattern = FileSystems.join(out, f"{options.shard_prefix}-*-of-*{shards.SHARD_SUFFIX}")
    if FileSystems.match([pattern])[0].metadata_list:
        raise InputError(f"{out} already holds {options.shard_prefix} shards; give the Beam job a fresh --out")
    tasks, skipped = plan_tasks(volumes, exclusions or set(), options.selection)

    results = (
        pipeline
        | "ListVolumes" >> beam.Create(tasks)
        | "Spread" >> beam.Reshuffle()
        | "Prepare" >> beam.Map(_prepare, options)
    )
    rows = results | "Rows" >> beam.Map(lambda r: r.row)
    plan = beam.pvalue.AsSingleton(
        rows
        | "GoodVolumes" >> beam.Filter(lambda row: row["status"] == manifest.OK)
        | "Counts" >> beam.Map(lambda row: (row["index"], row["slices_kept"], row["record_bytes"]))
        | "AllCounts" >> beam.combiners.ToList()
        | "PlanShards" >> beam.Map(_shard_plan, options)
    )
    (
        results
        | "Assign" >> beam.FlatMap(_assign, plan)
        | "GroupByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.Map(_write_shard, plan, out, options.shard_prefix)
    )
    (
        results
        | "QcKeys" >> beam.FlatMap(lambda r: ((f"{r.row['key']}/{j}", d) for j, d in enumerate(r.records)))
        | "QcSample" >> beam.CombineGlobally(_QcCombine(options))
        | "WriteQc" >> beam.Map(_write_qc, out)
    )
    (
        rows
        | "AllRows" >> beam.combiners.ToList()
        | "WriteReports" >> beam.Map(_write_reports, skipped, plan, out, options)
    )


PROG = "python -m data_prep.beam_pipeline"
EPILOG = """Every other flag is an Apache Beam pipeline option and goes to the runner as it is:
--runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner), --project, --region,
--temp_location, --setup_file, --num_workers and the rest of apache_beam.options.pipeline_options
(https://beam.apache.org/releases/pydoc/current/apache_beam.options.pipeline_options.html).
"""


def main(argv: list[str] | None = None) -> int:
    """The `braindino-prep` flags but the local runner's own (--workers, --keep-work,
    --no-progress), plus any Beam pipeline options."""
    args, beam_args = build_parser(PROG, local=False, epilog=EPILOG).parse_known_args(argv)
    options = options_from_args(args)
    start = time.perf_counter()
    try:
        volumes, exclusions = inputs_from_args(args)
        with beam.Pipeline(options=PipelineOptions(beam_args)) as pipeline:
            build_pipeline(pipeline, volumes, options, args.out, exclusions)
    except ConfigError as exc:
        print(f"{PROG}: error: {flag_error(exc)}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    with FileSystems.open(FileSystems.join(args.out, MANIFEST)) as f:
        rows = manifest.decode_manifest(f.read(), FileSystems.join(args.out, MANIFEST))
    found = FileSystems.match([FileSystems.join(args.out, f"{options.shard_prefix}-*")])[0].metadata_list
    qc = FileSystems.match([FileSystems.join(args.out, QC_DIR, "*.png")])[0].metadata_list
    summary = RunSummary.from_rows(
        rows,
        out_dir=args.out,
        shard_paths=sorted(m.path for m in found),
        shard_bytes=sum(m.size_in_bytes for m in found),
        qc_paths=sorted(m.path for m in qc),
        seconds=time.perf_counter() - start,
    )
    print(summary.format(options.max_failure_fraction))
    return summary.exit_code(options.max_failure_fraction)


if __name__ == "__main__":
    sys.exit(main())
