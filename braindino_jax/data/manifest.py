"""`manifest.jsonl`: one JSON row per input volume, including the ones that failed and why.

Rows are written in input order, so two runs over the same inputs give the same manifest
apart from timings. Statuses: "ok"; "failed" (a bad file, with the reason: these count toward
`--max-failure-fraction`); "skipped" (left out on purpose: a label image, a derivatives/ file,
an --exclude or --modality miss, a 4D file under `--four-d-policy skip`, a field of view too
small to be a brain, thick non-axial slices; with the reason); "skipped-excluded" (an excluded
subject) and "skipped-duplicate" (the same file listed twice). Only "failed" is a failure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any


OK = "ok"
FAILED = "failed"
SKIPPED = "skipped"
EXCLUDED = "skipped-excluded"
DUPLICATE = "skipped-duplicate"
STATUSES = (OK, FAILED, SKIPPED, EXCLUDED, DUPLICATE)


def encode_manifest(rows: Iterable[dict[str, Any]]) -> bytes:
    """JSON Lines bytes, one row per volume, keys sorted."""
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def decode_manifest(data: bytes, source: str = "manifest") -> list[dict[str, Any]]:
    """Rows of JSON Lines bytes; `source` names the file in errors."""
    rows = []
    for line_no, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{line_no}: not a JSON row: {exc}") from exc
        if not isinstance(row, dict) or row.get("status") not in STATUSES:
            raise ValueError(f"{source}:{line_no}: not a manifest row with a known status")
        rows.append(row)
    return rows


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return decode_manifest(f.read(), os.fspath(path))
