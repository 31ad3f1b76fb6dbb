"""End to end on phantoms: extraction, heads, sweeps, result files and figures; reruns hit the
cache and reproduce the numbers; the CLI validates configs and names bad fields."""

import csv
import json
import math

import numpy as np
import pytest

from braindino_jax.cli.probe import main
from braindino_jax.probes.config import apply_override, default_config, load_config, validate
from braindino_jax.probes.errors import ProbeConfigError
from braindino_jax.probes.protocol import figures, run_probe
from braindino_jax.probes.results import RESULT_COLUMNS
from braindino_jax.probes.volumes import read_probe_volume


def read_results(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_classification_end_to_end_then_rerun_from_cache(tmp_path, phantom_csv, cache_dir, small_config, tiny_arch):
    config = small_config(tmp_path / "run", phantom_csv, cache_dir)
    config.encoders = (f"random:{tiny_arch}", f"random-active:{tiny_arch}")
    config.task.image_columns = ("t1", "flair")
    config.features.modalities = "concat"
    config.heads = ("linear", "mlp", "knn")
    config.protocol.label_fractions = (0.5, 1.0)
    config.protocol.seeds = (0, 1)
    config.visualize.enabled = True
    config.visualize.n_volumes = 1
    config.visualize.n_slices = 2
    summary = run_probe(config)

    rows = read_results(tmp_path / "run" / "results.csv")
    assert tuple(rows[0]) == RESULT_COLUMNS
    headline = [r for r in rows if r["metric"] == "auc" and r["head"] in ("linear", "mlp", "knn")]
    assert len(headline) == 2 * 3 * 2 * 2  # encoders x heads x fractions x seeds
    assert all(math.isfinite(float(r["value"])) and 0 <= float(r["value"]) <= 1 for r in headline)
    metrics = {r["metric"] for r in rows}
    assert {"accuracy", "balanced_accuracy", "auc", "f1_macro", "auc_ci95_low", "auc_ci95_high", "k"} <= metrics
    assert {r["head"] for r in rows} >= {"knn_k1", "knn_k3"}
    for name in ("results.md", "summary.json", "metric_vs_fraction.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    for spec, info in summary["encoders"].items():
        assert info["extraction"]["embedded"] + info["extraction"]["cache_hits"] == 24  # 12 rows x 2 modalities
    figures = sorted(p.name for p in (tmp_path / "run" / "figures").rglob("*.png"))
    assert figures == sorted(["pca.png", "similarity.png", "tsne.png"] * 2)
    table = (tmp_path / "run" / "results.md").read_text()
    assert "### auc (higher is better; mean ± std over seeds)" in table and "bootstrap 95% CI" in table
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["task"]["split_subjects"] == {"train": 6, "val": 3, "test": 3}
    assert {r["train_subjects"] for r in saved["runs"]} == {3, 6}
    for run in saved["runs"]:
        if run["head"] != "knn":  # a confusion matrix of the test rows: true class by predicted
            matrix = run["confusion_matrix"]
            assert len(matrix) == 2 and all(len(r) == 2 for r in matrix)
            assert sum(map(sum, matrix)) == run["test_rows"] == 3
    # Every encoder on the same splits and label subsets.
    by_encoder = {}
    for run in saved["runs"]:
        by_encoder.setdefault(run["encoder"], []).append(
            (run["head"], run["label_fraction"], run["seed"], run["train_rows"], run["val_rows"], run["test_rows"]))
    assert len(by_encoder) == 2 and len({tuple(v) for v in by_encoder.values()}) == 1

    config.output_dir = str(tmp_path / "again")
    config.visualize.enabled = False
    again = run_probe(config)
    assert all(info["extraction"]["forward_passes"] == 0 for info in again["encoders"].values())
    assert all(info["extraction"]["cache_hits"] == 24 for info in again["encoders"].values())
    assert read_results(tmp_path / "again" / "results.csv") == rows  # the same numbers


@pytest.mark.parametrize("task_type, heads, headline", [
    ("regression", ("linear", "knn"), "mae"),
    ("survival", ("mlp",), "c_index"),
])
def test_regression_and_survival_end_to_end(tmp_path, phantom_csv, cache_dir, small_config, task_type, heads, headline):
    """Regression: two modalities averaged, max pooling of CLS + mean patch; survival:
    learned attention pooling. Each must give finite metrics."""
    config = small_config(tmp_path, phantom_csv, cache_dir, task_type, label_column="lesion_ml", log1p=task_type == "regression")
    config.heads = heads
    config.visualize.enabled = task_type == "survival"
    config.visualize.n_volumes = 0
    if task_type == "regression":
        config.task.image_columns = ("t1", "flair")
        config.features.update(dict(token="cls+patch_mean", pooling="max", modalities="average"))
    else:
        config.features.pooling = "attention"
    run_probe(config)
    rows = read_results(tmp_path / "results.csv")
    values = [float(r["value"]) for r in rows if r["metric"] == headline]
    assert values and all(math.isfinite(v) for v in values)
    if task_type == "survival":
        assert {r["metric"] for r in rows} == {"c_index", "logrank_p", "c_index_ci95_low", "c_index_ci95_high"}
        assert (next((tmp_path / "figures").iterdir()) / "kaplan_meier_mlp.png").stat().st_size > 0
        return
    assert {"mae", "rmse", "r2"} <= {r["metric"] for r in rows}
    # The same command from scratch (an empty cache: every volume featurised again) gives the
    # same numbers as the run that read the session's cached features.
    config.output_dir = str(tmp_path / "fresh")
    config.extract.cache_dir = str(tmp_path / "fresh_cache")
    fresh = run_probe(config)
    assert next(iter(fresh["encoders"].values()))["extraction"]["embedded"] == 24
    assert read_results(tmp_path / "fresh" / "results.csv") == rows


def test_segmentation_end_to_end(tmp_path, phantom_csv, cache_dir, small_config, monkeypatch):
    """64 slices from 3 mm volumes repeat some slices; Dice is taken over each distinct slice once."""
    from braindino_jax.probes import protocol

    config = small_config(tmp_path, phantom_csv, cache_dir, "segmentation",
                          label_values=(0, 1, 2, 3, 4), class_names=("background", "csf", "gm", "wm", "lesion"))
    config.input.n_slices = 64
    config.heads = ("linear",)
    config.segmentation.layers = (0, 1)
    config.segmentation.steps = 40
    config.segmentation.eval_every = 20
    config.visualize.enabled = True
    config.visualize.n_volumes = 0
    scored, dice_scores = [], protocol.dice_scores

    def recording(truth, prediction, n_classes):
        scored.append(len(truth))  # slices in the scored 3D stack
        return dice_scores(truth, prediction, n_classes)

    monkeypatch.setattr(protocol, "dice_scores", recording)
    summary = run_probe(config)
    prep = protocol.prep_config(config)
    distinct = {len(np.unique(read_probe_volume(phantom_csv.parent / f"images/sub-{i:03d}_T1w.nii.gz",
                                                prep).slice_indices)) for i in range(1, 13)}
    assert len(scored) == 3 and set(scored) <= distinct and max(distinct) < 64
    rows = read_results(tmp_path / "results.csv")
    assert {r["metric"] for r in rows} == {"dice_csf", "dice_gm", "dice_wm", "dice_lesion", "dice_mean",
                                           "dice_mean_ci95_low", "dice_mean_ci95_high"}
    mean = next(float(r["value"]) for r in rows if r["metric"] == "dice_mean")
    assert 0 < mean <= 1
    assert summary["runs"][0]["test_volumes"] == 3
    assert next((tmp_path / "figures").iterdir()).joinpath("segmentation_linear.png").stat().st_size > 0


def test_segmentation_fuses_image_columns_and_leaves_out_a_misaligned_row(tmp_path, phantom_csv, cache_dir,
                                                                         small_config, monkeypatch):
    """T1 and FLAIR patch maps are concatenated per patch; a FLAIR whose brain differs (its top
    half cut away: other slices kept) is a failure of that row, and the run goes on."""
    import nibabel as nib

    from braindino_jax.probes import protocol

    with open(phantom_csv) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for column in ("t1", "flair", "mask_path"):
            row[column] = str(phantom_csv.parent / row[column])
    source = nib.load(rows[1]["flair"])
    data = np.asarray(source.dataobj).copy()
    data[:, :, data.shape[2] // 2:] = 0
    data[:, data.shape[1] // 2:, :] = 0
    cut = tmp_path / "cut_FLAIR.nii.gz"
    nib.save(nib.Nifti1Image(data, source.affine, source.header), cut)
    rows[1]["flair"] = str(cut)
    task_csv = tmp_path / "task.csv"
    with open(task_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    config = small_config(tmp_path / "run", task_csv, cache_dir, "segmentation", label_values=(0, 1, 2, 3, 4))
    config.task.image_columns = ("t1", "flair")
    config.features.modalities = "concat"
    config.segmentation.layers = (0, 1)
    config.segmentation.steps = 10
    config.segmentation.eval_every = 10
    widths, train_decoder = [], protocol.train_decoder

    def recording(kind, train, val, n_classes, settings):
        widths.append(train[0].features.shape[-1])
        return train_decoder(kind, train, val, n_classes, settings)

    monkeypatch.setattr(protocol, "train_decoder", recording)
    summary = run_probe(config)
    assert widths == [2 * 2 * 64]  # columns x blocks x embed_dim
    assert [f["path"] for f in summary["failures"]] == [str(cut)]
    assert "column 'flair'" in summary["failures"][0]["reason"] and "not aligned" in summary["failures"][0]["reason"]
    run = summary["runs"][0]
    assert run["train_volumes"] + run["val_volumes"] + run["test_volumes"] == 11


def test_cli_runs_a_config_file_with_overrides(tmp_path, phantom_csv, cache_dir, capsys, tiny_arch):
    config_file = tmp_path / "probe.py"
    config_file.write_text(
        "from braindino_jax.probes.config import default_config\n\n"
        "def get_config(arg):\n"
        "    c = default_config()\n"
        "    c.task.csv = arg\n"
        "    c.task.label_column = 'lesion'\n"
        "    c.task.image_columns = ('t1',)\n"
        "    return c\n"
    )
    code = main(["--config", f"{config_file}:{phantom_csv}", "--quiet",
                 f"--config.output_dir={tmp_path / 'out'}", "--config.extract.cache_dir", cache_dir,
                 f"--config.encoders=random:{tiny_arch}", "--config.heads=linear",
                 "--config.input.target_spacing=(3.0, 3.0, 3.0)", "--config.input.n_slices=8",
                 "--config.input.size=64", "--config.input.image_size=64", "--config.extract.workers=0",
                 "--config.train.epochs=20", "--config.train.learning_rates=0.01", "--config.visualize.enabled=false",
                 "--config.protocol.val_fraction=0.25", "--config.protocol.test_fraction=0.25"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "# Probe results: task" in out and (tmp_path / "out" / "results.csv").is_file()


def test_cli_and_config_errors_name_the_field(tmp_path, capsys):
    assert main(["--config", "configs/probes/classification.py:missing.csv", "--config.heads=svm"]) == 2
    assert "config.heads[0]: 'svm' is not a classification head" in capsys.readouterr().err
    assert main(["--config", "configs/probes/classification.py", "--config.train.epohcs=3"]) == 2
    assert "config.train.epohcs: unknown field" in capsys.readouterr().err
    assert main(["--config", "configs/probes/classification.py", "--config.train.epochs=many"]) == 2
    assert "config.train.epochs: cannot set 'many'" in capsys.readouterr().err
    assert main(["--config", "configs/probes/classification.py:missing.csv", "--quiet"]) == 2
    assert "missing.csv: task CSV not found (config.task.csv)" in capsys.readouterr().err
    config = default_config()
    config.task.csv = "x.csv"
    config.input.n_slices = 0
    with pytest.raises(ProbeConfigError, match=r"config.input.n_slices: expected None or an integer >= 1"):
        validate(config)
    apply_override(config, "protocol.seeds", "0, 1, 2")
    assert config.protocol.seeds == (0, 1, 2)
    apply_override(config, "encoders", "random:vit_small(depth=4,embed_dim=192),export:/x")
    assert config.encoders == ("random:vit_small(depth=4,embed_dim=192)", "export:/x")


@pytest.mark.parametrize("name", ["classification", "regression", "survival", "segmentation", "knn", "demo"])
def test_shipped_configs_validate(name):
    arg = {"demo": "segmentation"}.get(name, "task.csv")
    config = load_config(f"configs/probes/{name}.py:{arg}")
    assert config.encoders and config.heads


def test_visualize_command_draws_pca_and_similarity_of_given_volumes(tmp_path, phantom_csv, tiny_arch, capsys):
    volume = next((phantom_csv.parent / "images").glob("*_T1w.nii.gz"))
    assert main(["visualize", "--encoder", f"random-active:{tiny_arch}", "--volume", str(volume),
                 "--out", str(tmp_path), "--slices", "2", "--config", "configs/probes/demo.py",
                 "--config.input.target_spacing=(3.0, 3.0, 3.0)", "--config.input.size=64",
                 "--config.input.image_size=64"]) == 0
    written = capsys.readouterr().out
    assert written.count("wrote ") == 2 and "pca.png" in written and "similarity.png" in written
    assert all(p.stat().st_size > 0 for p in tmp_path.rglob("*.png"))


def test_visualize_without_a_config_takes_overrides_and_a_chosen_reference_patch(tmp_path, phantom_csv, tiny_arch,
                                                                                 capsys):
    volume = str(next((phantom_csv.parent / "images").glob("*_T1w.nii.gz")))
    args = ["visualize", "--encoder", f"random-active:{tiny_arch}", "--volume", volume, "--out", str(tmp_path),
            "--slices", "2", "--config.input.target_spacing=(3.0, 3.0, 3.0)", "--config.input.size=64",
            "--config.input.image_size=64"]
    assert main(args + ["--reference", "1,2,1"]) == 0
    assert capsys.readouterr().out.count("wrote ") == 2
    # 64 px (the override) is a 4 x 4 patch grid, so (row 5, col 5) is off the map.
    assert main(args + ["--reference", "0,5,5"]) == 2
    assert "config.visualize.reference: (0, 5, 5) is outside the 2 shown slices x 4 x 4 patches" in capsys.readouterr().err
    assert main(args + ["--reference", "0,5"]) == 2
    assert "config.visualize.reference: expected () or (slice, row, col)" in capsys.readouterr().err


def test_visualize_on_a_config_task_draws_its_test_volumes_and_the_tsne(tmp_path, phantom_csv, cache_dir,
                                                                        small_config, tiny_arch):
    """``braindino-probe visualize --config`` without volumes (the CLI path is tested above)."""
    config = small_config(tmp_path / "run", phantom_csv, cache_dir)
    config.visualize.n_slices = 2
    written = figures(config, [f"random-active:{tiny_arch}"], [], tmp_path / "figures")
    assert sorted(p.name for p in written) == ["pca.png", "similarity.png", "tsne.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_a_probe_that_touches_the_encoder_parameters_is_refused(tmp_path, phantom_csv, cache_dir, small_config,
                                                                monkeypatch):
    from braindino_jax.probes import protocol

    heads = protocol._head_sweeps

    def nudging(*args):
        gamma = args[-2].model.blocks[0].ls1.gamma  # the encoder; one LayerScale entry by 1 ulp-ish
        gamma[...] = gamma[...].at[0].multiply(1 + 2**-20)
        return heads(*args)

    monkeypatch.setattr(protocol, "_head_sweeps", nudging)
    with pytest.raises(RuntimeError, match=r"parameters changed during the probe"):
        run_probe(small_config(tmp_path, phantom_csv, cache_dir))
