"""The Beam pipeline on the DirectRunner writes the same shards as the local runner."""

import json

import apache_beam as beam
import grain
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.options.pipeline_options import PipelineOptions

from braindino_jax.data import manifest, records, shards
from braindino_jax.data.inputs import InputVolume, discover
from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.phantom import write_phantom
from braindino_jax.preprocessing.volume import preprocess_volume
from data_prep.beam_pipeline import _prepare, build_pipeline
from data_prep.local_runner import RunOptions, run_local
from data_prep.options import build_parser, inputs_from_args


def _read(out):
    result = []
    for path in shards.list_shards(out, "slices"):
        source = grain.sources.ArrayRecordDataSource([str(path)])
        result.append((path.name, [records.decode(source[i]) for i in range(len(source))]))
    return result


def test_direct_runner_matches_local_runner(tmp_path):
    inputs = tmp_path / "in"
    for i, orientation in enumerate(["LPS", "RAS", "PIR"]):
        write_phantom(inputs / f"sub-{i}_FLAIR.nii.gz", i, spacing=(4.0, 4.0, 4.0),
                      orientation=orientation, skull_stripped=True)
    (inputs / "sub-9_FLAIR.nii.gz").write_bytes(b"not a volume")
    volumes = discover([f"ds={inputs}"])
    config = PrepConfig(target_spacing=None, size=32, margin=2)
    common = dict(config=config, workers=1, target_shard_records=10, target_shard_bytes=None,
                  progress=False)

    local = run_local(volumes, RunOptions(out_dir=tmp_path / "local", **common))
    assert local.ok == 3 and local.failed == 1

    with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as pipeline:
        build_pipeline(pipeline, volumes, RunOptions(out_dir=tmp_path / "beam", **common),
                       str(tmp_path / "beam"))

    local_shards, beam_shards = _read(tmp_path / "local"), _read(tmp_path / "beam")
    assert len(local_shards) > 1
    assert beam_shards == local_shards

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("timings", "reused")} for r in rows]

    assert strip(manifest.read_manifest(tmp_path / "beam" / "manifest.jsonl")) == strip(
        manifest.read_manifest(tmp_path / "local" / "manifest.jsonl"))
    beam_card = json.loads((tmp_path / "beam" / "dataset_card.json").read_text())
    local_card = json.loads((tmp_path / "local" / "dataset_card.json").read_text())
    assert beam_card == local_card
    assert json.loads((tmp_path / "beam" / "qc" / "index.json").read_text()) == json.loads(
        (tmp_path / "local" / "qc" / "index.json").read_text())


class _PrefixedLocalFileSystem(LocalFileSystem):
    """`braindinotest:///abs/path` → `/abs/path`: a stand-in for gs:// or s3:// in tests."""

    PREFIX = "braindinotest://"

    @classmethod
    def scheme(cls):
        return "braindinotest"

    def open(self, path, *args, **kwargs):
        return super().open(path.removeprefix(self.PREFIX), *args, **kwargs)


def test_csv_and_volumes_at_urls(tmp_path):
    """The README's Beam command lists volumes in a CSV at a URL, with paths relative to it."""
    write_phantom(tmp_path / "imgs" / "sub-3_T2w.nii.gz", 3, spacing=(4.0, 4.0, 4.0), skull_stripped=True)
    (tmp_path / "volumes.csv").write_text("path,subject\nimgs/sub-3_T2w.nii.gz,S3\n")
    url = f"{_PrefixedLocalFileSystem.PREFIX}{tmp_path}/volumes.csv"
    args = build_parser().parse_args(["--csv", url, "--out", str(tmp_path / "out")])
    (volume,) = inputs_from_args(args)[0]
    assert volume == InputVolume(f"{_PrefixedLocalFileSystem.PREFIX}{tmp_path}/imgs/sub-3_T2w.nii.gz",
                                 "volumes", "S3", "", "T2w", "imgs/sub-3_T2w.nii.gz")
    config = PrepConfig(target_spacing=None, size=32, margin=2)
    result = _prepare((0, volume), RunOptions(out_dir=tmp_path / "out", config=config))
    assert result.row["status"] == manifest.OK, result.row["reason"]
    assert result.row["path"] == volume.path
    local = preprocess_volume(tmp_path / "imgs" / "sub-3_T2w.nii.gz", config)[0]
    assert [records.decode(r).pixels.tobytes() for r in result.records] == [p.tobytes() for p in local.slices]
