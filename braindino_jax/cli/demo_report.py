"""The demo's ``report.html`` and its verdicts: what the three jobs made, on one page.

The page is self-contained (every image inlined as a PNG data URI, the style inline), so it
opens from disk, mailed or copied anywhere; its links point at the demo's files relative to
the page. The verdict of a probe is the pretrained teacher's headline metric minus that of the
better random control, with the task's headline head, on the test set at the largest label
fraction, averaged over seeds.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
from pathlib import Path
from typing import Any

from braindino_jax.data.atomic_file import write_atomic
from braindino_jax.probes.metrics import LOWER_IS_BETTER

# BrainDINO's probe head (LN -> Linear -> GELU -> Linear) for volume tasks; the linear decoder,
# which measures the frozen patch features most directly, for segmentation.
HEADLINE_HEAD = {"classification": "mlp", "regression": "mlp", "segmentation": "linear"}
TIE = 5e-4  # differences below this are not shown by the three decimals printed
_ROLES = (("workdir:", "pretrained teacher"), ("random-active:", "random init, LayerScale 1"),
          ("random:", "random init"), ("export:", "exported weights"), ("dinov3:", "DINOv3 weights"))


class DemoError(RuntimeError):
    """A demo stage that cannot run or failed, or results that are not there; the message says
    which stage, command or file."""


def _num(value: Any) -> float:
    """A value of summary.json, where NaN is stored as null."""
    return math.nan if value is None else float(value)


def role(spec: str) -> str:
    """What an encoder spec is, in the words of the report."""
    return next((name for prefix, name in _ROLES if spec.startswith(prefix)), spec)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One probe's pretrained-vs-random comparison on its headline metric."""

    task: str
    metric: str
    head: str
    pretrained: float
    controls: dict[str, float]  # random-init spec -> its value

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    @property
    def best_control(self) -> tuple[str, float]:
        finite = {k: v for k, v in self.controls.items() if math.isfinite(v)}
        if not finite:
            return "", math.nan
        spec = (min if self.lower_is_better else max)(finite, key=finite.get)
        return spec, finite[spec]

    @property
    def delta(self) -> float:
        return self.pretrained - self.best_control[1]

    def beats(self, spec: str) -> bool:
        """Whether the pretrained teacher scored strictly better than control ``spec``."""
        other = self.controls[spec]
        return self.pretrained < other if self.lower_is_better else self.pretrained > other

    def line(self) -> str:
        spec, value = self.best_control
        if not (math.isfinite(self.pretrained) and math.isfinite(value)):
            outcome = "undefined (a metric is NaN)"
        elif abs(self.delta) < TIE:
            outcome = f"tie (within {TIE:g})"
        else:
            outcome = "pretrained better" if all(self.beats(s) for s in self.controls) else "random better"
        direction = "lower" if self.lower_is_better else "higher"
        return (f"{self.task}: {self.metric} ({self.head} head) pretrained {self.pretrained:.3f} vs "
                f"{role(spec) or 'random'} {value:.3f} -> {self.delta:+.3f}, {outcome} "
                f"({direction} is better)")


def _summary(probe_dir: Path, task: str) -> dict[str, Any]:
    path = probe_dir / task / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DemoError(f"cannot read the {task} probe's results {path}: {exc}") from exc


def _headline_rows(summary: dict[str, Any]) -> tuple[str, float, list[dict[str, Any]]]:
    metric = summary["headline_metric"]
    rows = [r for r in summary["aggregated"] if r["metric"] == metric]
    fraction = max(r["label_fraction"] for r in rows)
    return metric, fraction, [r for r in rows if r["label_fraction"] == fraction]


def verdict_of(summary: dict[str, Any]) -> Verdict:
    task = summary["task"]["type"]
    metric, _, rows = _headline_rows(summary)
    head = HEADLINE_HEAD[task]
    values = {r["encoder"]: _num(r["mean"]) for r in rows if r["head"] == head}
    pretrained = [s for s in values if s.startswith("workdir:")]
    controls = {s: v for s, v in values.items() if s.startswith(("random:", "random-active:"))}
    if len(pretrained) != 1 or not controls:
        raise DemoError(f"the {task} probe has no {head}-head {metric} for one workdir: encoder and its "
                        f"random controls (encoders: {sorted(values)})")
    return Verdict(task, metric, head, values[pretrained[0]], controls)


def read_verdicts(probe_dir: Path, tasks: tuple[str, ...]) -> list[Verdict]:
    return [verdict_of(_summary(probe_dir, task)) for task in tasks]


def _image(path: Path, alt: str, width: str = "100%", scale: int = 1) -> str:
    """An <img> holding the PNG at ``path``; ``scale`` enlarges small images (pixels kept sharp)."""
    data = path.read_bytes()
    style = f"max-width:{width}"
    if scale > 1:
        png_width = int.from_bytes(data[16:20], "big")  # the IHDR chunk's width
        style += f";width:{png_width * scale}px;image-rendering:pixelated"
    return (f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{html.escape(alt)}" '
            f'style="{style}" data-file="{html.escape(path.name)}">')


def _link(target: Path, page_dir: Path, text: str | None = None) -> str:
    rel = os.path.relpath(target, page_dir)
    return f'<a href="{html.escape(Path(rel).as_posix())}">{html.escape(text or rel)}</a>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card_section(shards: Path, page_dir: Path) -> str:
    card = json.loads((shards / "dataset_card.json").read_text())

    def row(name: str, entry: dict[str, Any]) -> list[str]:
        v, p = entry["volumes"], entry["pixels"]
        return [html.escape(name), str(v.get("ok", 0)), str(v.get("failed", 0)),
                str(sum(n for k, n in v.items() if k.startswith("skipped"))), str(entry["subjects"]),
                str(entry["slices"]), f"{p['foreground_fraction']:.1%}"]

    rows = [row(f"dataset {k}", v) for k, v in sorted(card["per_dataset"].items())]
    rows += [row(f"modality {k}", v) for k, v in sorted(card["per_modality"].items())]
    rows.append(row("total", card["totals"]))
    prep = ", ".join(f"{k} = {html.escape(json.dumps(v))}" for k, v in card["preprocessing"].items())
    shard_files = ", ".join(_link(shards / f, page_dir, f) for f in card["shards"]["files"])
    return (_table(["", "volumes ok", "failed", "skipped", "subjects", "slices", "foreground"], rows)
            + f"<p>Shards: {shard_files} ({sum(card['shards']['records'])} records). "
            f"Preprocessing: {prep}.</p><p>Files: {_link(shards / 'dataset_card.json', page_dir)}, "
            f"{_link(shards / 'manifest.jsonl', page_dir)} (one row per input volume).</p>")


def _preview_legend(train_config: dict[str, Any]) -> str:
    a = train_config["augment"]
    patch = train_config["model"]["vit"]["patch_size"]
    return (f"<p class='legend'>Each row is one training slice as the pipeline and the on-device augmentation "
            f"make it. <b>Columns 1–2: the two global crops</b> ({a['global_size']} px; teacher and student "
            f"see them). <b>Columns 3–{2 + a['n_local']}: the {a['n_local']} local crops</b> "
            f"({a['local_size']} px; student only). <b>Red tint</b>: the {patch} px patches iBOT masks "
            "in the student's global crop (the student sees a mask token there and must predict the "
            "teacher's patch output). Grey levels are foreground z-scores through a fixed window "
            "[−2.5, 2.5]; mid-grey is background (z = 0).</p>")


_LOGGED = (("loss", "loss"), ("dino_loss", "DINO"), ("ibot_loss", "iBOT"), ("koleo_loss", "KoLeo"),
           ("diagnostics/target_entropy_ratio", "target entropy / ln K"),
           ("diagnostics/effective_prototypes", "effective prototypes"))


def _loss_table(metrics_path: Path) -> str:
    """The first and last logged losses and collapse diagnostics of the run."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    keys = [(k, name) for k, name in _LOGGED if any(k in r for r in rows)]
    logged = [r for r in rows if all(k in r for k, _ in keys)]
    if not logged:
        return "<p>No losses logged yet.</p>"
    shown = [logged[0]] if len(logged) == 1 else [logged[0], logged[-1]]
    return _table(["", *(name for _, name in keys)],
                  [[f"step {r['step']}", *(f"{r[k]:.4g}" for k, _ in keys)] for r in shown])


def _probe_section(summary: dict[str, Any], out_dir: Path, page_dir: Path) -> str:
    verdict = verdict_of(summary)
    metric, fraction, rows = _headline_rows(summary)
    encoders = sorted(summary["encoders"], key=lambda s: (not s.startswith("workdir:"), s))
    cells = {(r["encoder"], r["head"]): r for r in rows}
    heads = sorted({r["head"] for r in rows if not r["head"].startswith("knn_k")},
                   key=lambda h: (h != verdict.head, h))
    body = []
    for head in heads:
        values = [cells.get((e, head)) for e in encoders]
        text = ["n/a" if v is None or not math.isfinite(_num(v["mean"])) else f"{v['mean']:.3f}"
                + (f" ± {v['std']:.3f}" if math.isfinite(_num(v["std"])) else "") for v in values]
        means = {e: _num(v["mean"]) for e, v in zip(encoders, values) if v is not None}
        pre = [m for e, m in means.items() if e.startswith("workdir:")]
        ctl = [m for e, m in means.items() if e.startswith("random") and math.isfinite(m)]
        best = (min if verdict.lower_is_better else max)(ctl) if ctl else math.nan
        delta = pre[0] - best if pre and ctl else math.nan
        label = f"<b>{head}</b> (headline)" if head == verdict.head else head
        body.append([label, *text, "n/a" if not math.isfinite(delta) else f"{delta:+.3f}"])
    header = ["head", *(f"{html.escape(role(e))}<br><code>{html.escape(e)}</code>" for e in encoders),
              "pretrained − better random"]
    split = summary["task"]["split_subjects"]
    return (f"<h3>{html.escape(summary['task']['type'])}: {html.escape(metric)} "
            f"({'lower' if verdict.lower_is_better else 'higher'} is better)</h3>"
            f"<p class='verdict'>{html.escape(verdict.line())}</p>" + _table(header, body)
            + f"<p>Test-set {html.escape(metric)} at label fraction {fraction:g}, mean ± std over seeds; "
            f"subjects train/val/test {split['train']}/{split['val']}/{split['test']}. All metrics: "
            f"{_link(out_dir / 'results.md', page_dir)}, {_link(out_dir / 'results.csv', page_dir)}, "
            f"{_link(out_dir / 'summary.json', page_dir)}.</p>")


def _figure(summary: dict[str, Any], out_dir: Path, spec: str, name: str) -> Path | None:
    from braindino_jax.probes.protocol import slug

    path = out_dir / "figures" / f"{slug(spec)}-{summary['encoders'][spec]['fingerprint'][:8]}" / name
    return path if path.is_file() else None


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}code{font-size:85%}
.verdict{font-weight:bold}.legend{background:#f8f8f0;padding:.5em;border-left:4px solid #c33}
figure{margin:1em 0}figcaption{color:#555;font-size:90%}.row{display:flex;gap:1em;flex-wrap:wrap}
.row figure{flex:1 1 30%}
"""


def write_report(layout: Any, tasks: tuple[str, ...]) -> Path:
    """Write ``layout.report`` from the stages' outputs; returns its path."""
    page_dir = layout.report.parent
    train_config = json.loads((layout.train / "config.json").read_text())
    summaries = {task: _summary(layout.probe, task) for task in tasks}
    qc = sorted((layout.shards / "qc").glob("*.png"))
    parts = [
        "<h1>BrainDINO-JAX demo report</h1>",
        "<p>Phantom brain volumes were prepared into ArrayRecord shards (<code>braindino-prep</code>), "
        "a small ViT was pretrained on them with the BrainDINO objective (<code>braindino-train "
        "--config configs/debug_cpu.py</code>), and its frozen teacher was probed on three phantom "
        "tasks against the same architecture at random init (<code>braindino-probe</code>).</p>",
        "<p class='verdict'>" + "<br>".join(html.escape(verdict_of(s).line()) for s in summaries.values()) + "</p>",
        "<h2>1. Dataset card</h2>", _card_section(layout.shards, page_dir),
        "<h2>2. QC montages</h2><p>Written slices, cropped to the brain and enlarged; letters give the "
        "stored directions (A top, P bottom, L left, R right: neurological). <code>worst_foreground</code> "
        "shows the slices with the least brain, where a bad mask or crop shows first.</p>",
        *(f"<figure>{_image(p, p.stem)}<figcaption>{html.escape(p.name)}</figcaption></figure>" for p in qc),
        "<h2>3. Augmentation preview</h2>", _preview_legend(train_config),
        f"<figure>{_image(layout.preview, 'augmentation preview', width='100%', scale=2)}</figure>",
        "<h2>4. Pretraining curves</h2>",
        f"<p>Run: {_link(layout.train, page_dir)} (checkpoints, {_link(layout.train / 'metrics.jsonl', page_dir)}, "
        "TensorBoard events, teacher export). First and last logged losses:</p>",
        _loss_table(layout.train / "metrics.jsonl"),
        f"<figure>{_image(layout.train / 'curves.png', 'loss and diagnostic curves')}<figcaption>Losses and "
        "collapse diagnostics (teacher target entropy: ln K is uniform collapse, near 0 one-hot collapse)."
        "</figcaption></figure>",
        "<h2>5. PCA feature maps</h2><p>The first three principal components of each encoder's "
        "foreground patch features on test slices, as RGB (classification task).</p><div class='row'>",
    ]
    cls = summaries[tasks[0]]
    for spec in sorted(cls["encoders"], key=lambda s: not s.startswith("workdir:")):
        path = _figure(cls, layout.probe_dir(tasks[0]), spec, "pca.png")
        if path is not None:
            parts.append(f"<figure>{_image(path, f'PCA {spec}')}<figcaption>{html.escape(role(spec))}"
                         "</figcaption></figure>")
    parts.append("</div><h2>6. Probes: pretrained vs random init</h2>")
    for task, summary in summaries.items():
        parts.append(_probe_section(summary, layout.probe_dir(task), page_dir))
        if summary["task"]["type"] == "segmentation":
            spec = next(s for s in summary["encoders"] if s.startswith("workdir:"))
            path = _figure(summary, layout.probe_dir(task), spec, f"segmentation_{HEADLINE_HEAD['segmentation']}.png")
            if path is not None:
                parts.append(f"<figure>{_image(path, 'segmentation')}<figcaption>Pretrained teacher, "
                             "linear decoder, a test subject.</figcaption></figure>")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>BrainDINO-JAX demo</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    write_atomic(layout.report, page.encode())
    return layout.report
