"""The end-of-run summary both runners print, and the exit code it implies."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from braindino_jax.data import manifest


@dataclasses.dataclass
class RunSummary:
    out_dir: Path | str
    listed: int
    ok: int
    failed: int
    skipped: int
    excluded: int
    duplicates: int
    reused: int
    slices: int
    shard_bytes: int
    seconds: float
    failures: list[tuple[str, str]]
    skips: list[tuple[str, str]]
    series_failures: list[tuple[str, str]]  # failed volumes of 4D series whose others were kept
    shard_paths: list  # Path, or str for a remote (Beam) output
    qc_paths: list
    work: str | None = None  # what happened to the local runner's work folder

    @classmethod
    def from_rows(
        cls,
        rows: list[dict[str, Any]],
        out_dir: Path | str,
        shard_paths: list,
        shard_bytes: int,
        qc_paths: list,
        seconds: float,
    ) -> "RunSummary":
        def count(status: str) -> int:
            return sum(r["status"] == status for r in rows)

        return cls(
            out_dir=out_dir,
            listed=len(rows),
            ok=count(manifest.OK),
            failed=count(manifest.FAILED),
            skipped=count(manifest.SKIPPED),
            excluded=count(manifest.EXCLUDED),
            duplicates=count(manifest.DUPLICATE),
            reused=sum(bool(r.get("reused")) for r in rows if r["status"] == manifest.OK),
            slices=sum(r["slices_kept"] for r in rows if r["status"] == manifest.OK),
            shard_bytes=shard_bytes,
            seconds=seconds,
            failures=[(r["path"], r["reason"]) for r in rows if r["status"] == manifest.FAILED],
            skips=[(r["path"], r["reason"]) for r in rows if r["status"] == manifest.SKIPPED],
            series_failures=[
                (f"{r['path']} (volume {v['volume_index']})", v["reason"])
                for r in rows if r["status"] == manifest.OK for v in r.get("volumes_failed", ())
            ],
            shard_paths=list(shard_paths),
            qc_paths=list(qc_paths),
        )

    @property
    def failure_fraction(self) -> float:
        """Failed over attempted volumes (skipped, excluded and duplicate ones were not attempted)."""
        attempted = self.ok + self.failed
        return self.failed / attempted if attempted else 0.0

    def exit_code(self, max_failure_fraction: float) -> int:
        """0 unless nothing was written or too many volumes failed."""
        return 1 if self.exit_reason(max_failure_fraction) else 0

    def exit_reason(self, max_failure_fraction: float) -> str | None:
        """Why the run exits with code 1, with the numbers; None when it succeeded."""
        if self.failure_fraction > max_failure_fraction:
            return (f"{self.failed} of {self.ok + self.failed} attempted volumes failed "
                    f"({self.failure_fraction:.0%}), more than --max-failure-fraction {max_failure_fraction:g}: exit code 1")
        if self.slices == 0:
            return "no slices were written: exit code 1"
        return None

    def format(self, max_failure_fraction: float | None = None, listed: int = 10) -> str:
        """The summary; with ``max_failure_fraction``, a failing run's last line says why it
        fails. At most ``listed`` skipped files are named (the manifest has them all)."""
        processed = self.ok + self.failed - self.reused
        rate = processed / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"volumes: {self.listed} listed, {self.ok} ok ({self.reused} reused from an earlier run), "
            f"{self.failed} failed, {self.skipped} skipped, {self.excluded} excluded, {self.duplicates} duplicate",
            f"slices written: {self.slices} in {len(self.shard_paths)} shards, "
            f"{self.shard_bytes / 1e9:.3f} GB",
            f"time: {self.seconds:.1f} s, {rate:.2f} volumes/s, "
            f"{self.shard_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0:.1f} MB/s written",
            f"shards:   {_parent(self.shard_paths[0])}/ ({len(self.shard_paths)} files: "
            f"{_name(self.shard_paths[0])} ...)" if self.shard_paths else "shards:   none written",
            f"manifest: {self.out_dir}/manifest.jsonl",
            f"card:     {self.out_dir}/dataset_card.json",
            f"QC:       {_parent(self.qc_paths[0])}/ ({len(self.qc_paths)} montages)"
            if self.qc_paths else "QC:       none",
        ]
        if self.work:
            lines.append(f"work:     {self.work}")
        if self.skips:
            lines.append(f"skipped ({self.skipped}, not failures):")
            lines.extend(f"  {path}: {reason}" for path, reason in self.skips[:listed])
            if self.skipped > listed:
                lines.append(f"  ... and {self.skipped - listed} more (status \"skipped\" in manifest.jsonl)")
        if self.failures:
            lines.append(f"failures ({self.failed}):")
            lines.extend(f"  {path}: {reason}" for path, reason in self.failures)
        if self.series_failures:
            lines.append(f"4D volumes skipped, the rest of their series kept ({len(self.series_failures)}):")
            lines.extend(f"  {path}: {reason}" for path, reason in self.series_failures)
        reason = None if max_failure_fraction is None else self.exit_reason(max_failure_fraction)
        if reason:
            lines.append(reason)
        return "\n".join(lines)


def _parent(path) -> str:
    return str(path).rsplit("/", 1)[0]


def _name(path) -> str:
    return str(path).rsplit("/", 1)[-1]
