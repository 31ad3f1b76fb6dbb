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
    excluded: int
    duplicates: int
    reused: int
    slices: int
    shard_bytes: int
    seconds: float
    failures: list[tuple[str, str]]
    series_failures: list[tuple[str, str]]  # failed volumes of 4D series whose others were kept
    shard_paths: list  # Path, or str for a remote (Beam) output
    qc_paths: list

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
            excluded=count(manifest.EXCLUDED),
            duplicates=count(manifest.DUPLICATE),
            reused=sum(bool(r.get("reused")) for r in rows if r["status"] == manifest.OK),
            slices=sum(r["slices_kept"] for r in rows if r["status"] == manifest.OK),
            shard_bytes=shard_bytes,
            seconds=seconds,
            failures=[(r["path"], r["reason"]) for r in rows if r["status"] == manifest.FAILED],
            series_failures=[
                (f"{r['path']} (volume {v['volume_index']})", v["reason"])
                for r in rows if r["status"] == manifest.OK for v in r.get("volumes_failed", ())
            ],
            shard_paths=list(shard_paths),
            qc_paths=list(qc_paths),
        )

    @property
    def failure_fraction(self) -> float:
        attempted = self.ok + self.failed
        return self.failed / attempted if attempted else 0.0

    def exit_code(self, max_failure_fraction: float) -> int:
        """0 unless nothing was written or too many volumes failed."""
        if self.slices == 0 or self.failure_fraction > max_failure_fraction:
            return 1
        return 0

    def format(self) -> str:
        processed = self.ok + self.failed - self.reused
        rate = processed / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"volumes: {self.listed} listed, {self.ok} ok ({self.reused} reused from an earlier run), "
            f"{self.failed} failed, {self.excluded} excluded, {self.duplicates} duplicate",
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
        if self.failures:
            lines.append(f"failures ({self.failed}):")
            lines.extend(f"  {path}: {reason}" for path, reason in self.failures)
        if self.series_failures:
            lines.append(f"4D volumes skipped, the rest of their series kept ({len(self.series_failures)}):")
            lines.extend(f"  {path}: {reason}" for path, reason in self.series_failures)
        return "\n".join(lines)


def _parent(path) -> str:
    return str(path).rsplit("/", 1)[0]


def _name(path) -> str:
    return str(path).rsplit("/", 1)[-1]
