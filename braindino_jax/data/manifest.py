"""`manifest.jsonl`: one JSON row per input volume, including the ones that failed and why.

Rows are written in input order, so two runs over the same inputs give the same manifest
apart from timings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from braindino_jax.data.atomic_file import write_atomic

OK = "ok"
FAILED = "failed"
EXCLUDED = "skipped-excluded"
DUPLICATE = "skipped-duplicate"
STATUSES = (OK, FAILED, EXCLUDED, DUPLICATE)


def write_manifest(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    lines = [json.dumps(row, sort_keys=True, ensure_ascii=False) for row in rows]
    write_atomic(path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not a JSON row: {exc}") from exc
            if row.get("status") not in STATUSES:
                raise ValueError(f"{path}:{line_no}: unknown status {row.get('status')!r}")
            rows.append(row)
    return rows
