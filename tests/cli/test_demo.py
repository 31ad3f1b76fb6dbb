"""`braindino demo`: one real run of every stage (README's command, shrunk by --tiny and --steps),
its artefacts, its report in a browser, re-use of finished stages, and the quick start."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TASKS = ("classification", "regression", "segmentation")
TINY = ["--tiny", "--steps", "2"]


def quickstart_blocks() -> list[str]:
    """The first two fenced bash blocks of README.md: install-and-demo, then the tests."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) >= 2, "README.md: expected the two quick-start bash blocks"
    return [b.strip() for b in blocks[:2]]


def console_scripts() -> dict[str, str]:
    text = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"([\w-]+)=([\w.]+:\w+)"', text))


def _as_python(command: list[str]) -> list[str]:
    """A console script of setup.py as `python -c`, so the tree under test runs it whether or not
    this environment installed that script."""
    module, func = console_scripts()[command[0]].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())", *command[1:]]


def _env(quick_compile: bool = True) -> dict[str, str]:
    """One CPU device, as on a user's laptop (not the suite's 8); with ``quick_compile`` XLA's
    backend optimisation is off: the same programs compile in about a third of the time, which
    is what a run of a few steps spends its time on."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    if quick_compile:
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    return env


def run_readme_demo(out: Path, extra: list[str], timeout: float, quick_compile: bool = True
                    ) -> subprocess.CompletedProcess:
    """README's `braindino demo` command with `extra` flags and `--out out`."""
    demo = quickstart_blocks()[0].split("&&")[-1].split()
    assert demo[:2] == ["braindino", "demo"], demo
    return subprocess.run(_as_python(demo + extra + ["--out", str(out)]), cwd=out.parent,
                          env=_env(quick_compile), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "braindino_demo"
    t0 = time.perf_counter()
    result = run_readme_demo(out, TINY, timeout=600)
    seconds = time.perf_counter() - t0
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"tiny demo: {seconds:.0f} s in {out}")
    return out, result.stdout


def _pngs_in_report(page: str) -> dict[str, bytes]:
    return {name: base64.b64decode(data) for data, name in
            re.findall(r'src="data:image/png;base64,([^"]+)"[^>]*data-file="([^"]+)"', page)}


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.hrefs = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
        if tag == "a":
            self.hrefs.append(attrs.get("href", ""))


def test_every_stage_leaves_its_artefacts(demo):
    out, stdout = demo
    # Shards: the records the card counts are in the ArrayRecord files, and decode.
    from array_record.python.array_record_module import ArrayRecordReader

    from braindino_jax.data.records import decode

    card = json.loads((out / "shards" / "dataset_card.json").read_text())
    counts = []
    for name in card["shards"]["files"]:
        reader = ArrayRecordReader(str(out / "shards" / name))
        counts.append(reader.num_records())
        first = decode(reader.read([0])[0])
        reader.close()
        assert first.pixels.dtype == np.uint8 and first.pixels.ndim == 2
    assert counts == card["shards"]["records"] and sum(counts) == card["totals"]["slices"] > 0
    manifest = [json.loads(line) for line in (out / "shards" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == card["totals"]["volumes"]["ok"] == 4  # --tiny: 1 head x 2 sessions x FLAIR, T1w
    assert {row["status"] for row in manifest} == {"ok"}
    # Pretraining: an Orbax checkpoint at the last step, the teacher export, metrics, curves.
    steps = [int(p.name) for p in (out / "train" / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == [2]
    assert any((out / "train" / "export").iterdir())
    logged = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and np.isfinite(logged[-1]["loss"])
    # Probes: every task compared the trained teacher with both random controls.
    train_dir = str(out / "train")
    encoders = {f"workdir:{train_dir}", f"random:like=workdir:{train_dir}", f"random-active:like=workdir:{train_dir}"}
    for task in TASKS:
        with open(out / "probe" / task / "results.csv") as f:
            rows = list(csv.DictReader(f))
        assert {r["encoder"] for r in rows} == encoders, task
        headline = json.loads((out / "probe" / task / "summary.json").read_text())["headline_metric"]
        assert {r["encoder"] for r in rows if r["metric"] == headline} == encoders
    # Every PNG is a readable image.
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) >= 10
    for path in pngs:
        with Image.open(path) as image:
            image.verify()
    # The command says where everything went and gives one verdict per probe.
    for line in ("report:", "checkpoints:", "shards:"):
        assert line in stdout
    verdicts = [line for line in stdout.splitlines() if re.match(r"\s+(classification|regression|segmentation): ", line)]
    assert [v.split(":")[0].strip() for v in verdicts] == list(TASKS)
    assert all("pretrained" in v and "->" in v for v in verdicts)


def test_report_inlines_every_figure_and_has_no_broken_links(demo):
    out, _ = demo
    page = (out / "report.html").read_text()
    inlined = _pngs_in_report(page)
    expected = [*(out / "shards" / "qc").glob("*.png"), out / "preview" / "augmentation.png",
                out / "train" / "curves.png"]
    for path in expected:
        assert inlined.get(path.name) == path.read_bytes(), f"{path} is not inlined in report.html"
    pca_files = {p.read_bytes() for p in (out / "probe" / "classification" / "figures").glob("*/pca.png")}
    pca_inlined = {base64.b64decode(v) for v in
                   re.findall(r'src="data:image/png;base64,([^"]+)"[^>]*data-file="pca.png"', page)}
    assert len(pca_files) == 3 and pca_inlined == pca_files  # the teacher's and both controls'
    refs = _Refs()
    refs.feed(page)
    assert refs.srcs and all(src.startswith("data:image/png;base64,") for src in refs.srcs)
    assert refs.hrefs
    for href in refs.hrefs:
        assert not re.match(r"[a-z]+:", href), f"report.html links outside the demo: {href}"
        assert (out / href).exists(), f"report.html: broken link {href}"
    # The probe table compares the teacher with both controls, per task, with the verdict.
    for task in TASKS:
        assert f"<h3>{task}:" in page
    assert page.count("pretrained − better random") == 3
    assert "global crops" in page and "local crops" in page and "Red tint" in page


_REPORT_PROBE = """<script>
window.addEventListener("load", () => {
  const widths = Array.from(document.images, img => img.naturalWidth);
  document.body.setAttribute("data-natural-widths", widths.join(","));
});
</script></body>"""


def test_report_renders_in_headless_chromium(demo, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (`.ci/run` installs it: apt-get install -y chromium)")
    out, _ = demo
    report = out / "report.html"
    n_images = report.read_text().count("<img ")
    probe = out / "report_probe.html"  # beside the report, so that its relative links resolve alike
    probe.write_text(report.read_text().replace("</body>", _REPORT_PROBE))
    base = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run(base + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    widths = re.search(r'data-natural-widths="([^"]*)"', dom.stdout)
    assert widths, "the page's load handler did not run"
    widths = [int(w) for w in widths.group(1).split(",")]
    assert len(widths) == n_images >= 8 and min(widths) > 0, widths  # QC x2, preview, curves, PCA x3, ...
    screenshot = tmp_path / "report.png"
    shot = subprocess.run(base + [f"--screenshot={screenshot}", "--window-size=1280,4000", report.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("L"))
    assert pixels.shape == (4000, 1280) and pixels.std() > 20  # a page of text and images, not blank
    print(f"report screenshot: {screenshot}")


def test_rerun_reuses_every_finished_stage(demo):
    out, _ = demo
    report = out / "report.html"
    before = report.stat().st_mtime_ns
    checkpoint = sorted((out / "train" / "checkpoints").iterdir())
    result = run_readme_demo(out, TINY, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(7 of 7 stages reused)" in result.stdout
    assert "$ braindino-" not in result.stdout  # no command ran again
    assert sorted((out / "train" / "checkpoints").iterdir()) == checkpoint
    assert report.stat().st_mtime_ns > before  # the report is always rewritten


def test_an_edited_config_file_redoes_its_stages(tmp_path, monkeypatch):
    """Stage settings hold the config files' contents, so a changed (e.g. pulled) demo config
    is not answered with results made under the old one."""
    import argparse
    import shutil

    from braindino_jax.cli import demo

    configs = tmp_path / "configs"
    shutil.copytree(demo.configs_dir(), configs)
    monkeypatch.setattr(demo, "configs_dir", lambda: configs)
    args = argparse.Namespace(tiny=True, steps=None)

    def settings():
        return {stage.name: stage.settings for stage in demo._stages(demo.Layout(tmp_path / "out"), args)}

    before = settings()
    with open(configs / "probes" / "demo.py", "a") as f:
        f.write("# edited\n")
    after = settings()
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == ["probe-classification", "probe-regression", "probe-segmentation"]
    with open(configs / "debug_cpu.py", "a") as f:
        f.write("# edited\n")
    assert sorted(n for n in after if after[n] != settings()[n]) == ["train"]


def test_stage_markers_reuse_resume_and_redo(tmp_path):
    from braindino_jax.cli.demo import Layout, Stage, run_stages

    layout = Layout(tmp_path / "out")
    calls = []

    def stages(a_setting="x", b_extent=1, fail_b=False):
        a_out, b_out = layout.out / "a", layout.out / "b"

        def run_a():
            calls.append("a")
            a_out.mkdir(parents=True, exist_ok=True)
            (a_out / "data").write_text(a_setting)

        def run_b():
            calls.append("b")
            b_out.mkdir(parents=True, exist_ok=True)
            (b_out / f"part{len(list(b_out.iterdir()))}").write_text("")
            if fail_b:
                raise KeyboardInterrupt

        return [Stage("a", "A", [a_setting], run_a, [a_out]), Stage("b", "B", ["b"], run_b, [b_out], b_extent)]

    run_stages(layout, stages())
    assert calls == ["a", "b"]
    assert [r["reused"] for r in run_stages(layout, stages())] == [True, True] and calls == ["a", "b"]
    # A longer extent re-runs the stage in place (training resumes from its checkpoint).
    run_stages(layout, stages(b_extent=2))
    assert calls[2:] == ["b"] and len(list((layout.out / "b").iterdir())) == 2
    # An interrupted stage has no finished marker: the next run resumes it in place.
    with pytest.raises(KeyboardInterrupt):
        run_stages(layout, stages(b_extent=3, fail_b=True))
    run_stages(layout, stages(b_extent=3))
    assert calls[3:] == ["b", "b"] and len(list((layout.out / "b").iterdir())) == 4
    # New settings upstream: that stage and every later one start over from empty folders.
    run_stages(layout, stages(a_setting="y", b_extent=3))
    assert calls[5:] == ["a", "b"] and len(list((layout.out / "b").iterdir())) == 1
    assert (layout.out / "a" / "data").read_text() == "y"
    # --fresh: everything again.
    run_stages(layout, stages(a_setting="y", b_extent=3), fresh=True)
    assert calls[7:] == ["a", "b"]


def test_verdict_compares_with_the_better_control_in_the_metrics_direction():
    from braindino_jax.cli.demo_report import Verdict

    mae = Verdict("regression", "mae", "mlp", 0.5, {"random:x": 0.7, "random-active:x": 0.6})
    assert mae.best_control == ("random-active:x", 0.6) and mae.delta == pytest.approx(-0.1)
    assert mae.beats("random:x") and mae.beats("random-active:x")
    assert "-0.100, pretrained better (lower is better)" in mae.line()
    auc = Verdict("classification", "auc", "mlp", 0.8, {"random:x": 0.9, "random-active:x": 0.5})
    assert auc.best_control == ("random:x", 0.9) and not auc.beats("random:x") and auc.beats("random-active:x")
    assert "-0.100, random better (higher is better)" in auc.line()
    nan = Verdict("segmentation", "dice_mean", "linear", float("nan"), {"random:x": 0.3})
    assert "undefined" in nan.line()


def test_bad_steps_is_an_error_naming_the_flag(capsys):
    from braindino_jax.cli.demo import main

    assert main(["demo", "--steps", "0", "--out", "unused"]) == 2
    assert "--steps: expected >= 1, got 0" in capsys.readouterr().err
    assert not Path("unused").exists()


def test_configs_folder_is_found_or_named(monkeypatch, tmp_path):
    import braindino_jax
    from braindino_jax.cli.demo import DemoError, configs_dir

    assert configs_dir() == REPO / "configs"
    (tmp_path / "braindino_jax").mkdir()
    monkeypatch.setattr(braindino_jax, "__file__", str(tmp_path / "braindino_jax" / "__init__.py"))
    with pytest.raises(DemoError, match=re.escape(str(tmp_path / "configs")) + ".*pip install -e"):
        configs_dir()


def test_readme_quick_start_commands_work_as_written(tmp_path):
    install_demo, tests = quickstart_blocks()
    for block in (install_demo, tests):
        assert subprocess.run(["bash", "-n", "-c", block]).returncode == 0, block
    steps = [s.strip() for s in install_demo.split("&&")]
    assert steps == ["python3 -m venv .venv", ". .venv/bin/activate", "pip install -e .", "braindino demo"]
    # The console script the demo step calls is declared, and the demo's own CLI accepts it.
    assert console_scripts()["braindino"] == "braindino_jax.cli.demo:main"
    demo_help = subprocess.run(_as_python(["braindino", "demo", "--help"]), env=_env(), capture_output=True, text=True)
    assert demo_help.returncode == 0 and "--steps" in demo_help.stdout and "--fresh" in demo_help.stdout
    # The venv step works here (without pip: the install itself is what .ci/run checks).
    assert subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / ".venv")]).returncode == 0
    assert (tmp_path / ".venv" / "bin" / "activate").is_file()
    install, test = [s.strip() for s in tests.split("&&")]
    extras = re.fullmatch(r"pip install -e '\.\[([\w,]+)\]'", install)
    assert extras, install
    setup_text = (REPO / "setup.py").read_text()
    for extra in extras.group(1).split(","):
        assert f'"{extra}": [' in setup_text, f"setup.py has no extra {extra!r}"
    assert test == "python -m pytest -q"
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "tests/cli"],
                               cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert collected.returncode == 0 and "test_readme_quick_start_commands_work_as_written" in collected.stdout


def test_readme_python_usage_and_torch_export_run_on_the_demo_outputs(demo, monkeypatch):
    """README's Python example and its `braindino-convert to-torch` line, as written, after the
    demo (in the folder the demo was run from)."""
    out, _ = demo
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Using the library from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(out.parent)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    embed_dim = json.loads((out / "train" / "config.json").read_text())["model"]["vit"]["embed_dim"]
    assert namespace["cls"].shape == (128, embed_dim) and namespace["feature"].shape == (embed_dim,)
    assert np.all(np.isfinite(namespace["feature"]))
    export = re.search(r"^braindino-convert to-torch braindino_demo/train/export \S+$", readme, re.M).group(0).split()
    result = subprocess.run(_as_python(export), cwd=out.parent, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    from braindino_jax.models.convert import read_state_dict

    state = read_state_dict(out.parent / export[-1])
    assert state["backbone.cls_token"].shape[-1] == embed_dim and "backbone.blocks.0.attn.qkv.weight" in state
    assert any(k.startswith("dino_head.") for k in state) and any(k.startswith("ibot_head.") for k in state)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # pyproject's 900 s is for the default run
def test_full_demo_pretrained_beats_both_random_controls(tmp_path):
    """The default demo, as README runs it: pretraining must have taught the teacher something."""
    from braindino_jax.cli.demo_report import read_verdicts

    out = tmp_path / "braindino_demo"
    result = run_readme_demo(out, [], timeout=3600, quick_compile=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    verdicts = {v.task: v for v in read_verdicts(out / "probe", TASKS)}
    for task, metric in (("classification", "auc"), ("segmentation", "dice_mean")):
        verdict = verdicts[task]
        assert verdict.metric == metric
        for control in verdict.controls:
            assert verdict.beats(control), verdict.line()
