"""One page per exported model: how good it is, how sure of itself, where it fails, how fast.

Export writes ``report.html`` into the model directory, so it travels with the version:
registered with it in MLflow, copied into every served directory, answered by the
service at ``GET /report``. The page is self-contained (pipelines/reporting.py): no
scripts, figures inlined, nothing fetched, so it opens the same from MLflow, the
service or disk.

A regression model (metadata task ``regression``) gets its own middle: MAE, RMSE and R² with
their intervals, the champion on the same numbers, predicted against true, the residuals and
the largest errors, in place of the per-class table, confusion matrix, calibration and mistakes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipelines.report.evaluation import (
    LOWER_IS_BETTER, METRICS, REGRESSION_METRICS, Evaluation, Latency, RegressionEvaluation, confident_mistakes,
    largest_errors,
)
from serving.scoring import ParityReport
from pipelines.report.plots import (
    confusion_figure, learning_curves_figure, predicted_vs_true_figure, reliability_figure, residuals_figure,
    sample_figure,
)
from pipelines.reporting import Markup, esc, image, page, table
from serving.contract import ModelMetadata

log = logging.getLogger(__name__)

CURVES = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_r2")
METRIC_NAMES = {"mae": "MAE", "rmse": "RMSE", "r2": "R²"}


@dataclass(frozen=True)
class ChampionComparison:
    """The registry's champion when this model was exported, scored on this model's test split."""

    version: str
    evaluation: Evaluation | RegressionEvaluation | None = None
    note: str = ""  # why it was not scored, when it was not


@dataclass(frozen=True)
class ReportInputs:
    metadata: ModelMetadata
    evaluation: Evaluation | RegressionEvaluation
    test_x: np.ndarray
    parity: ParityReport
    latency: Sequence[Latency]
    split_sizes: Mapping[str, int]
    history: Mapping[str, Sequence[tuple[int, float]]] = field(default_factory=dict)
    champion: ChampionComparison | None = None
    created: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.2f}%"


def _regression(inputs: ReportInputs) -> bool:
    return isinstance(inputs.evaluation, RegressionEvaluation)


def _number(value: float | None) -> str:
    """A regression metric in the target's units (or R²): four significant digits, — when absent or undefined."""
    if value is None or not np.isfinite(value):
        return "—"
    return f"{value:.4g}"


def _summary(inputs: ReportInputs) -> str:
    m = inputs.metadata
    rows = [("model", m.model_name), ("architecture", m.architecture), ("task", m.task), ("MLflow run", m.run_id),
            ("dataset", m.dataset), ("data version (DVC md5)", m.data_version),
            ("input", f"{m.kind or 'tensor'} {list(m.input_shape)}, "
                      + (f"target {m.labels[0]}" if _regression(inputs) else f"{len(m.labels)} labels")),
            ("exported", inputs.created.strftime("%Y-%m-%d %H:%M:%S UTC"))]
    return table(("", "value"), rows, left=2)


def _metrics(inputs: ReportInputs) -> str:
    trained = inputs.metadata.test_metrics
    rows = []
    for name in METRICS:
        interval = inputs.evaluation.metrics[name]
        rows.append((name, _pct(interval.value), f"{_pct(interval.low)} – {_pct(interval.high)}",
                     _pct(trained.get(f"test_{name}"))))
    samples = len(inputs.evaluation.truth)
    note = (f'<p class="muted">{samples} test samples, answered by the exported ONNX graph as the service runs it; '
            "the interval is a 95% percentile bootstrap over samples (1,000 resamples). "
            "“As trained” is the PyTorch model on the same split.</p>")
    return table(("metric", "as served", "95% interval", "as trained"), rows) + note


def _champion(inputs: ReportInputs) -> str:
    champion = inputs.champion
    if champion is None:
        return "<p>No champion was registered when this model was exported: it is the first of its name.</p>"
    if champion.evaluation is None:
        return f"<p>Champion v{esc(champion.version)} was not compared: {esc(champion.note)}</p>"
    if _regression(inputs):
        return _regression_champion(inputs)
    if not isinstance(champion.evaluation, Evaluation):
        return f"<p>Champion v{esc(champion.version)} was not compared: it is a regression model.</p>"
    ours, theirs = inputs.evaluation, champion.evaluation
    rows = []
    for name in METRICS:
        delta = ours.metrics[name].value - theirs.metrics[name].value
        css = "good" if delta > 0 else "bad" if delta < 0 else "muted"
        rows.append((name, _pct(ours.metrics[name].value), _pct(theirs.metrics[name].value),
                     Markup(f'<span class="{css}">{delta * 100:+.2f} pts</span>')))
    ece_delta = ours.calibration.ece - theirs.calibration.ece
    rows.append(("ECE (lower is better)", f"{ours.calibration.ece:.4f}", f"{theirs.calibration.ece:.4f}",
                 Markup(f'<span class="{"good" if ece_delta < 0 else "bad" if ece_delta > 0 else "muted"}">'
                        f"{ece_delta:+.4f}</span>")))
    note = (f'<p class="muted">Both graphs scored on this model\'s test split; the promotion gate decides on the '
            f"same numbers (its decision is export/gate.json in the run). {esc(champion.note)}</p>")
    return table(("metric", "this model", f"champion v{champion.version}", "difference"), rows) + note


def _per_class(inputs: ReportInputs) -> str:
    labels = inputs.metadata.labels
    recalls = [c["recall"] for c in inputs.evaluation.per_class]
    worst = int(np.argmin(recalls)) if recalls else -1
    rows = []
    for i, c in enumerate(inputs.evaluation.per_class):
        name = Markup(f'<span class="bad">{esc(labels[i])} (lowest recall)</span>') if i == worst else labels[i]
        rows.append((name, _pct(c["precision"]), _pct(c["recall"]), _pct(c["f1"]), c["support"]))
    return table(("label", "precision", "recall", "F1", "support"), rows)


def _calibration(inputs: ReportInputs) -> str:
    result = inputs.evaluation.calibration
    text = (f"<p>Expected calibration error <b>{result.ece:.4f}</b> over {len(result.bin_count)} equal-width bins of "
            "the top probability: how far, on average, the confidence a client sees is from how often it is right.</p>")
    return text + image(reliability_figure(result), "reliability diagram: accuracy per confidence bin")


def _mistakes(inputs: ReportInputs) -> str:
    rows = confident_mistakes(inputs.evaluation)
    if not rows:
        return "<p>No test sample was misclassified.</p>"
    labels, kind = inputs.metadata.labels, inputs.metadata.kind or "tensor"
    figures = []
    for row in rows:
        predicted = int(inputs.evaluation.predicted[row])
        confidence = float(inputs.evaluation.probabilities[row, predicted])
        title = f"true {labels[int(inputs.evaluation.truth[row])]} → {labels[predicted]} ({confidence:.2f})"
        figures.append(image(sample_figure(inputs.test_x[row], kind, title), f"test row {row}: {title}"))
    return (f'<p class="muted">The {len(rows)} wrong answers given with the highest confidence (true → predicted, '
            "confidence).</p>" + "".join(figures))


def _regression_metrics(inputs: ReportInputs) -> str:
    trained = inputs.metadata.test_metrics
    rows = []
    for name in REGRESSION_METRICS:
        interval = inputs.evaluation.metrics[name]
        rows.append((METRIC_NAMES[name], _number(interval.value), f"{_number(interval.low)} – {_number(interval.high)}",
                     _number(trained.get(f"test_{name}"))))
    samples = len(inputs.evaluation.truth)
    note = (f'<p class="muted">{samples} test samples, answered by the exported ONNX graph as the service runs it; '
            f"MAE and RMSE in the units of {esc(inputs.metadata.labels[0])} (lower is better), R² the share of its "
            "variance explained (1 is perfect, 0 is predicting the mean). The interval is a 95% percentile "
            "bootstrap over samples (1,000 resamples). “As trained” is the PyTorch model on the same split.</p>")
    return table(("metric", "as served", "95% interval", "as trained"), rows) + note


def _regression_champion(inputs: ReportInputs) -> str:
    champion = inputs.champion
    ours, theirs = inputs.evaluation, champion.evaluation
    if not isinstance(theirs, RegressionEvaluation):
        return f"<p>Champion v{esc(champion.version)} was not compared: it is not a regression model.</p>"
    rows = []
    for name in REGRESSION_METRICS:
        delta = ours.metrics[name].value - theirs.metrics[name].value
        better = -delta if name in LOWER_IS_BETTER else delta
        css = "good" if better > 0 else "bad" if better < 0 else "muted"
        rows.append((METRIC_NAMES[name] + (" (lower is better)" if name in LOWER_IS_BETTER else ""),
                     _number(ours.metrics[name].value), _number(theirs.metrics[name].value),
                     Markup(f'<span class="{css}">{delta:+.4g}</span>')))
    note = (f'<p class="muted">Both graphs scored on this model\'s test split; the promotion gate decides on the '
            f"same numbers (its decision is export/gate.json in the run). {esc(champion.note)}</p>")
    return table(("metric", "this model", f"champion v{champion.version}", "difference"), rows) + note


def _predicted_vs_true(inputs: ReportInputs) -> str:
    evaluation = inputs.evaluation
    return image(predicted_vs_true_figure(evaluation.truth, evaluation.values, inputs.metadata.labels[0]),
                 "predicted against true value on the test split (the dashed line: a perfect model)")


def _residuals(inputs: ReportInputs) -> str:
    evaluation = inputs.evaluation
    residuals = evaluation.residuals
    text = (f"<p>Residuals (true − predicted): mean <b>{_number(float(residuals.mean()))}</b> (a bias when far from "
            f"0), standard deviation {_number(float(residuals.std()))}, median absolute "
            f"{_number(float(np.median(np.abs(residuals))))}.</p>")
    return text + image(residuals_figure(evaluation.truth, evaluation.values),
                        "residual against prediction (a pattern is error the model could still learn), and their histogram")


def _largest_errors(inputs: ReportInputs) -> str:
    evaluation = inputs.evaluation
    rows = [(row, _number(float(evaluation.truth[row])), _number(float(evaluation.values[row])),
             _number(float(evaluation.residuals[row]))) for row in largest_errors(evaluation)]
    return (table(("test row", "true", "predicted", "residual"), rows)
            + '<p class="muted">The test samples answered furthest from their true value.</p>')


def _curves(inputs: ReportInputs) -> str:
    history, caption = inputs.history, "per-epoch loss and accuracy"
    if _regression(inputs):  # accuracy means nothing for a value: loss and validation R² only
        history = {key: points for key, points in history.items() if not key.endswith("_accuracy")}
        caption = "per-epoch loss and validation R²"
    uri = learning_curves_figure(history)
    return image(uri, caption) if uri else "<p>The run logged no per-epoch curves.</p>"


def _parity(inputs: ReportInputs) -> str:
    p = inputs.parity
    regression = _regression(inputs)
    rows = [("samples", p.samples), ("max |Δvalue|" if regression else "max |Δlogit|", f"{p.max_abs_diff:.2e}"),
            ("allowed (export.parity_atol)", f"{p.atol:.0e}"),
            *([] if regression else [("argmax agreement", _pct(p.argmax_agreement))]),
            ("result", Markup('<span class="good">passed</span>' if p.passed else '<span class="bad">failed</span>'))]
    return table(("PyTorch vs ONNX Runtime", "value"), rows)


def _latency(inputs: ReportInputs) -> str:
    rows = [(lat.batch_size, f"{lat.median_ms:.3f}", f"{lat.p95_ms:.3f}", f"{lat.instances_per_s:,.0f}")
            for lat in inputs.latency]
    return (table(("batch", "median ms", "p95 ms", "instances/s"), rows)
            + '<p class="muted">One ONNX Runtime call on the exporting machine\'s CPU provider, without HTTP; '
              "the service adds batching and transport.</p>")


def _variants(inputs: ReportInputs) -> str:
    variants = inputs.metadata.variants
    if not variants and _regression(inputs):
        return "<p>No lower-precision variant was tried: the variants' gate judges accuracy, so regression models " \
               "are served in fp32.</p>"
    if not variants:
        return "<p>No lower-precision variant was tried (export.variants is empty).</p>"

    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    rows = []
    for name, d in variants.items():
        verdict = Markup('<span class="good">kept</span>' if d.get("kept") else '<span class="muted">not kept</span>')
        drop = d.get("accuracy_drop")
        rows.append((name, verdict, _pct(d.get("test_accuracy")), "—" if drop is None else f"{drop:+.2f} pts",
                     ms(d.get("latency_ms_batch1")), ms(d.get("latency_ms_batch32")),
                     "—" if d.get("speedup") is None else f"{d['speedup']:.2f}x"))
    reasons = "".join(f"<li><b>{esc(name)}</b>: {esc(d.get('reason', ''))}</li>" for name, d in variants.items())
    return (table(("variant", "decision", "test accuracy", "drop vs fp32", "batch 1 ms", "batch 32 ms",
                   "speedup (batch 32)"), rows, left=2)
            + f"<ul>{reasons}</ul>"
            + '<p class="muted">Each variant is timed against the fp32 graph in the same process, runs alternated, on '
              "the provider that serves it; kept when it loses at most export.max_accuracy_drop points and reaches "
              "export.min_speedup. The service runs the fastest kept one unless FLUXO_VARIANT says otherwise.</p>")


def _data(inputs: ReportInputs) -> str:
    rows = [(split, f"{count:,}") for split, count in inputs.split_sizes.items()]
    return (f"<p>Data version <code>{esc(inputs.metadata.data_version)}</code> "
            f"(dataset {esc(inputs.metadata.dataset)}).</p>" + table(("split", "samples"), rows))


def render_report(inputs: ReportInputs) -> str:
    """The whole page as HTML text."""
    m = inputs.metadata
    if _regression(inputs):
        return _render_regression(inputs)
    accuracy = inputs.evaluation.metrics["accuracy"]
    subtitle = (f"{m.architecture} on {m.dataset}: test accuracy {_pct(accuracy.value)} as served "
                f"(95% interval {_pct(accuracy.low)} – {_pct(accuracy.high)}), run {m.run_id}")
    sections = [
        ("Model", _summary(inputs)),
        ("Test metrics", _metrics(inputs)),
        ("Against the champion", _champion(inputs)),
        ("Per class", _per_class(inputs)),
        ("Confusion matrix", image(confusion_figure(inputs.evaluation.confusion, m.labels),
                                   "confusion matrix on the test split (rows: true label)")),
        ("Calibration", _calibration(inputs)),
        ("Most confident mistakes", _mistakes(inputs)),
        ("Learning curves", _curves(inputs)),
        ("Parity", _parity(inputs)),
        ("Latency", _latency(inputs)),
        ("Variants", _variants(inputs)),
        ("Data", _data(inputs)),
    ]
    return page(f"{m.model_name} — model report", subtitle, sections)


def _render_regression(inputs: ReportInputs) -> str:
    m = inputs.metadata
    r2, mae = inputs.evaluation.metrics["r2"], inputs.evaluation.metrics["mae"]
    subtitle = (f"{m.architecture} on {m.dataset}: test R² {_number(r2.value)} as served "
                f"(95% interval {_number(r2.low)} – {_number(r2.high)}), MAE {_number(mae.value)}, run {m.run_id}")
    sections = [
        ("Model", _summary(inputs)),
        ("Test metrics", _regression_metrics(inputs)),
        ("Against the champion", _champion(inputs)),
        ("Predicted against true", _predicted_vs_true(inputs)),
        ("Residuals", _residuals(inputs)),
        ("Largest errors", _largest_errors(inputs)),
        ("Learning curves", _curves(inputs)),
        ("Parity", _parity(inputs)),
        ("Latency", _latency(inputs)),
        ("Variants", _variants(inputs)),
        ("Data", _data(inputs)),
    ]
    return page(f"{m.model_name} — model report", subtitle, sections)


def write_report(path: Path, inputs: ReportInputs) -> Path:
    path = Path(path)
    path.write_text(render_report(inputs), encoding="utf-8")
    return path
