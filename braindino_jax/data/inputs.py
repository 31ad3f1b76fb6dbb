"""Which volumes a preparation job reads, and the metadata that goes into their records.

Inputs come from roots searched with glob patterns, or from a CSV listing them. Dataset,
subject, session and modality come from the CSV, else from BIDS-style names
(`sub-01_ses-1_T1w.nii.gz`, or `sub-*`/`ses-*` folders), else from defaults. The same file
listed twice is read once; subjects in an exclusion list never reach the shards, so that
evaluation subjects cannot leak into pretraining. An `InputSelection` skips what is not an
image to pretrain on (BIDS `derivatives/` folders, label images such as `_dseg` and `_mask`),
files matching `--exclude` globs and modalities not asked for; skipped files stay listed.

Each volume also carries its path relative to its root (the `--root` folder, or the CSV's
folder), which is what records store (`<dataset>/<relative path>`): shards made from the same
files are then the same bytes wherever the files or the output live.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import os
import posixpath
import re
from collections.abc import Sequence
from pathlib import Path

DEFAULT_PATTERNS = ("**/*.nii.gz", "**/*.nii", "**/*.hdr")
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".hdr", ".img")
CSV_COLUMNS = ("path", "dataset", "subject", "session", "modality")
# File-name suffixes of label images (BIDS derivatives: dseg, probseg, mask; BraTS: seg).
LABEL_SUFFIXES = ("dseg", "probseg", "mask", "label", "labels", "seg", "roi")


class InputError(ValueError):
    """Inputs that cannot be listed: a missing root, an empty search, a malformed CSV."""


@dataclasses.dataclass(frozen=True)
class InputVolume:
    """One input file and the metadata its slices will carry."""

    path: str  # absolute path or URL, as read (and as the manifest lists it)
    dataset: str
    subject: str
    session: str
    modality: str
    relative_path: str = ""  # POSIX path under its root; "" means just the file name

    @property
    def source(self) -> str:
        """`<dataset>/<path relative to its root>`: the `source_path` its records store."""
        return f"{self.dataset}/{self.relative_path or posixpath.basename(self.path.replace(os.sep, '/'))}"


@dataclasses.dataclass(frozen=True)
class InputSelection:
    """Which listed files to prepare; the others are kept in the manifest as skipped.

    `exclude`: fnmatch globs over the path relative to its root (`*` also matches `/`) and over
    the file name. `modalities`: keep only these (case-insensitive; empty = all).
    """

    exclude: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    include_derivatives: bool = False
    include_labels: bool = False

    def skip_reason(self, volume: InputVolume) -> str | None:
        """Why `volume` is skipped, or None when it is to be prepared."""
        relative = volume.relative_path or posixpath.basename(volume.path)
        name = posixpath.basename(relative)
        if not self.include_derivatives and "derivatives" in relative.split("/")[:-1]:
            return "in a BIDS derivatives/ folder: derived data, not an acquired image (--include-derivatives keeps it)"
        suffix = strip_volume_extension(name).rsplit("_", 1)[-1].lower()
        if not self.include_labels and suffix in LABEL_SUFFIXES:
            return f"a label image (file-name suffix _{suffix}), not an MR image (--include-labels keeps it)"
        for glob in self.exclude:
            if fnmatch.fnmatchcase(relative, glob) or fnmatch.fnmatchcase(name, glob):
                return f"matches --exclude {glob!r}"
        wanted = {m.lower() for m in self.modalities}
        if wanted and volume.modality.lower() not in wanted:
            return f"modality {volume.modality!r} is not one of --modality {', '.join(self.modalities)}"
        return None


def is_url(path: str) -> bool:
    """`gs://...`, `s3://...`: read through Apache Beam's file systems, not the local disk."""
    return re.match(r"^[a-z][a-z0-9+.-]*://", path) is not None


def strip_volume_extension(name: str) -> str:
    for ext in VOLUME_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


_ENTITY = re.compile(r"^([A-Za-z0-9]+)-([A-Za-z0-9]+)$")


def parse_bids_name(path: str | os.PathLike) -> dict[str, str]:
    """`subject`, `session` and `modality` found in a BIDS-style path (missing keys = not found).

    The subject and session keep their BIDS prefixes (`sub-01`, `ses-1`), as in
    `participants.tsv`; the modality is the file's suffix (`T1w`, `FLAIR`, `bold`...).
    """
    path = Path(path)
    stem = strip_volume_extension(path.name)
    found: dict[str, str] = {}
    parts = stem.split("_")
    entities = [m for m in (_ENTITY.match(p) for p in parts) if m]
    for m in entities:
        if m.group(1) == "sub":
            found.setdefault("subject", m.group(0))
        elif m.group(1) == "ses":
            found.setdefault("session", m.group(0))
    if entities and len(parts) > 1 and not _ENTITY.match(parts[-1]) and parts[-1]:
        found["modality"] = parts[-1]
    for folder in reversed(path.parent.parts):
        m = _ENTITY.match(folder)
        if m and m.group(1) == "sub":
            found.setdefault("subject", folder)
        elif m and m.group(1) == "ses":
            found.setdefault("session", folder)
    return found


def _metadata(
    path: str, dataset: str, default_modality: str, given: dict[str, str], relative_path: str
) -> InputVolume:
    bids = parse_bids_name(path)
    return InputVolume(
        path=path if is_url(path) else os.path.abspath(path),
        dataset=given.get("dataset") or dataset,
        subject=given.get("subject") or bids.get("subject") or strip_volume_extension(Path(path).name),
        session=given.get("session") or bids.get("session", ""),
        modality=given.get("modality") or bids.get("modality", default_modality),
        relative_path=relative_path,
    )


def parse_root(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` (the dataset is then named after the folder)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    root = Path(spec)
    return root.resolve().name or "dataset", root


def discover(
    roots: Sequence[str],
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    default_modality: str = "unknown",
) -> list[InputVolume]:
    """Files under each root matching any pattern, sorted, each tagged with its metadata."""
    volumes: list[InputVolume] = []
    for spec in roots:
        dataset, root = parse_root(spec)
        if not root.is_dir():
            raise InputError(f"input root {root}: not a directory")
        matches: set[Path] = set()
        for pattern in patterns:
            matches.update(p for p in root.glob(pattern) if p.is_file() or p.is_symlink())
        volumes.extend(_metadata(str(p), dataset, default_modality, {}, p.relative_to(root).as_posix())
                       for p in sorted(matches))
    if not volumes:
        raise InputError(
            f"no input volumes found under {', '.join(roots)} matching {', '.join(patterns)}"
        )
    return volumes


def _read_text(location: str) -> str:
    """A local file's text, or a URL's through Apache Beam's file systems (the `beam` extra)."""
    if not is_url(location):
        with open(location, newline="", encoding="utf-8") as f:
            return f.read()
    try:
        from apache_beam.io.filesystems import FileSystems
    except ImportError as exc:
        raise OSError("reading a URL needs Apache Beam's file systems: pip install 'braindino_jax[beam]'") from exc
    with FileSystems.open(location) as f:
        return f.read().decode("utf-8")


def read_csv(csv_path: str | os.PathLike, default_modality: str = "unknown") -> list[InputVolume]:
    """Volumes listed in a CSV with a `path` column (relative paths are relative to the CSV).

    The CSV may be a URL (`gs://bucket/volumes.csv`, read through Apache Beam's file systems),
    as a Beam job's listing usually is; its relative paths then become URLs beside it. Optional
    columns `dataset`, `subject`, `session`, `modality` override what the file name says; the
    dataset defaults to the CSV's file name. A volume's path relative to its root (see the
    module docstring) is the path as the CSV gives it when relative, else relative to the CSV's
    folder when inside it, else relative to the deepest folder common to the others.
    """
    location = os.fspath(csv_path)
    remote = is_url(location)
    folder, _, name = location.rpartition("/") if remote else (None, None, Path(location).name)
    try:
        text = _read_text(location)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        rows = list(reader)
    except Exception as exc:  # OSError, bad UTF-8, csv.Error, or a remote file system's own errors
        raise InputError(f"{location}: cannot read the input CSV: {exc}") from exc
    if "path" not in header:
        raise InputError(f"{location}: the input CSV needs a 'path' column (found {header})")
    unknown = sorted(set(header) - set(CSV_COLUMNS))
    if unknown:
        raise InputError(f"{location}: unknown CSV columns {unknown} (known: {list(CSV_COLUMNS)})")
    entries = []
    for line, row in enumerate(rows, start=2):
        raw = (row.get("path") or "").strip()
        if not raw:
            raise InputError(f"{location}:{line}: empty 'path'")
        if os.path.isabs(raw) or is_url(raw):
            path = raw
        else:
            path = f"{folder}/{raw}" if remote else str(Path(location).parent / raw)
        entries.append((raw, path, {k: (row.get(k) or "").strip() for k in CSV_COLUMNS[1:]}))
    if not entries:
        raise InputError(f"{location}: the input CSV lists no volumes")
    csv_folder = folder if remote else os.path.dirname(os.path.abspath(location))
    relative = _relative_paths([raw for raw, _, _ in entries], csv_folder)
    return [_metadata(path, Path(name).stem, default_modality, given, rel)
            for (_, path, given), rel in zip(entries, relative)]


def _relative_paths(listed: list[str], folder: str) -> list[str]:
    """POSIX paths relative to the CSV's folder (see read_csv) for the paths as a CSV lists them."""
    def posix(p: str) -> str:
        return re.sub(r"^[a-z][a-z0-9+.-]*://", "/", p).replace(os.sep, "/")

    base = posixpath.normpath(posix(folder))
    absolute = [posixpath.normpath(posix(p)) for p in listed if os.path.isabs(p) or is_url(p)]
    outside = [p for p in absolute if not p.startswith(base.rstrip("/") + "/")]
    common = posixpath.dirname(posixpath.commonpath(outside)) if len(outside) == 1 else (
        posixpath.commonpath(outside) if outside else base)
    out = []
    for p in listed:
        if not (os.path.isabs(p) or is_url(p)):
            out.append(posixpath.normpath(posix(p)))
            continue
        p = posixpath.normpath(posix(p))
        out.append(posixpath.relpath(p, base if p.startswith(base.rstrip("/") + "/") else common))
    return out


def find_duplicates(volumes: Sequence[InputVolume]) -> list[str | None]:
    """Per listing, the path of an earlier listing of the same file (by real path), else None."""
    first: dict[str, str] = {}
    out: list[str | None] = []
    for volume in volumes:
        key = os.path.realpath(volume.path)
        out.append(first.get(key))
        first.setdefault(key, volume.path)
    return out


def _normalise_subject(subject: str) -> str:
    return subject.removeprefix("sub-")


def read_exclusions(path: str | os.PathLike) -> set[str]:
    """Subject IDs to exclude, one per line: `ID` (any dataset) or `DATASET/ID`; `#` comments."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the subject exclusion list: {exc}") from exc
    entries = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            dataset, sep, subject = line.rpartition("/")
            entries.add(f"{dataset}/{_normalise_subject(subject)}" if sep else _normalise_subject(subject))
    return entries


def is_excluded(volume: InputVolume, exclusions: set[str]) -> bool:
    subject = _normalise_subject(volume.subject)
    return subject in exclusions or f"{volume.dataset}/{subject}" in exclusions
