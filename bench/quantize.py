"""int8 and fp16 variants against the fp32 graph, per preset, in one run: size, test accuracy, latency.

    .venv/bin/python bench/quantize.py [--presets digits-cnn mnist-lenet ...] [--epochs N] [--budget 2]

Each preset (``configs/<name>.yaml``) is trained the way ``fluxo train`` trains it, minus
MLflow (``train_and_evaluate`` with a NullTracker, as bench/accuracy.py; ``--epochs`` caps the
recipe's epochs), its best checkpoint exported to ONNX as the export step does, and then
``pipelines.export.variants.build_variants`` runs on it with the default gate
(export.max_accuracy_drop 0.5 points, export.min_speedup 1.2x at batch 32): the decision column
is what ``fluxo export`` would decide on this machine. Variants export does not build here are
still measured, by ``variants.compare`` (the same checks and timing), and marked "(not built)":
fp16 without a CUDA device, int8 for a recurrent graph (ONNX Runtime quantizes only the layers
around its GRU). Latency is one in-process ONNX Runtime run (one intra-op thread, as the
service's default), fp32 and variant alternated in the same process, median over ``--budget``
seconds per batch size. Prints a table, writes bench/results/quantize.json with the machine's
load average before and after (the machine is shared: absolute numbers move, ratios much less).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ["digits-cnn", "mnist-lenet", "mnist1d-resnet", "mnist1d-gru"]


def machine() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from serving.runtime import choose_providers

    cpu = platform.processor() or "unknown"
    if Path("/proc/cpuinfo").exists():
        text = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
        vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    else:
        vnni = None
    return {"cpu": cpu, "cores": os.cpu_count(), "vnni": vnni, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "provider": choose_providers()[0]}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"load average {os.getloadavg()}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def export_fp32(checkpoint: Path, dataset: Any, model_dir: Path, opset: int) -> bool:
    """``model_dir/model.onnx`` as the export step writes it; True when the graph takes lengths."""
    from pipelines.export.onnx_export import export_onnx, lengths_graph, servable
    from pipelines.train.checkpoint import load_checkpoint, rebuild_model

    model, spec = rebuild_model(load_checkpoint(checkpoint))
    with_lengths = lengths_graph(model, bool(dataset.manifest.get("variable_length")))
    task = spec.get("task")
    graph = servable(with_lengths, task) if with_lengths is not None else servable(model, task)
    export_onnx(graph, tuple(spec["input_shape"]), model_dir / "model.onnx", opset, with_lengths=with_lengths is not None)
    return with_lengths is not None


def measure_preset(preset: str, work: Path, args: argparse.Namespace, projects: dict) -> dict[str, Any]:
    from pipelines.data.ingest import ingest, version
    from pipelines.data.store import read_dataset
    from pipelines.export import variants
    from pipelines.settings import load_settings
    from pipelines.train.run import train_and_evaluate
    from pipelines.train.tracker import NullTracker
    from serving.runtime import choose_providers

    remote = work / "dvc-remote"
    overrides = [f"data.dvc_remote={remote}", "data.push=false", f"train.checkpoint_dir={work / 'checkpoints'}"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    settings = load_settings(ROOT / "configs" / f"{preset}.yaml", overrides)
    key = json.dumps(settings.data.model_dump(mode="json", exclude={"dvc_remote", "push"}), sort_keys=True)
    if key not in projects:
        project = work / f"project-{len(projects)}"
        project.mkdir(parents=True, exist_ok=True)
        ingest(project, settings.data)
        projects[key] = (project, version(project, settings.data))
    project, data_version = projects[key]
    dataset = read_dataset(project / settings.data.data_dir)
    started = time.perf_counter()
    _, metrics, checkpoint, result = train_and_evaluate(project, settings, data_version, NullTracker(), run_key=preset)
    train_seconds = time.perf_counter() - started
    model_dir = work / "export" / preset
    model_dir.mkdir(parents=True, exist_ok=True)
    takes_lengths = export_fp32(checkpoint, dataset, model_dir, settings.export.opset)

    gate = settings.export.model_copy(update={"variants": ["int8", "fp16"]})
    decisions = variants.build_variants(model_dir, dataset, gate, takes_lengths=takes_lengths, budget_s=args.budget,
                                        seed=settings.train.seed)
    providers = choose_providers()
    rows: dict[str, dict[str, Any]] = {}
    for name, decision in decisions.items():
        row = {"built": decision.size_bytes is not None, **decision.as_dict()}
        if not row["built"]:  # measure what export refused before building, for the record
            scratch = Path(tempfile.mkdtemp(dir=work))
            try:
                if name == "int8":
                    graph = variants.quantize_int8(model_dir / "model.onnx", scratch / "int8.onnx",
                                                   variants.calibration_reader(dataset), provider=providers[0])
                else:
                    graph = variants.convert_fp16(model_dir / "model.onnx", scratch / "fp16.onnx")
                measured = variants.compare(model_dir / "model.onnx", graph, dataset, gate,
                                            takes_lengths=takes_lengths, providers=providers, budget_s=args.budget)
                row["measured_anyway"] = {k: v for k, v in measured.as_dict().items() if k not in ("kept",)}
            except Exception as error:  # noqa: BLE001 - a graph ORT cannot build or run is a result too
                row["measured_anyway"] = {"error": f"{type(error).__name__}: {error}"}
        rows[name] = row
    fp32 = next((r for r in rows.values() if r.get("fp32_latency_ms_batch32")), None) or next(
        (r["measured_anyway"] for r in rows.values() if "fp32_latency_ms_batch32" in r.get("measured_anyway", {})), {})
    return {
        "config": f"configs/{preset}.yaml",
        "model": settings.model.name,
        "dataset": settings.data.dataset,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "train_seconds": round(train_seconds, 1),
        "test_accuracy_pytorch": metrics["test_accuracy"],
        "takes_lengths": takes_lengths,
        "fp32": {"size_bytes": (model_dir / "model.onnx").stat().st_size,
                 "test_accuracy": fp32.get("fp32_test_accuracy"),
                 "latency_ms_batch1": fp32.get("fp32_latency_ms_batch1"),
                 "latency_ms_batch32": fp32.get("fp32_latency_ms_batch32")},
        "variants": rows,
        "provider": providers[0],
    }


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'preset':15s} {'variant':8s} {'size kB':>8s} {'test acc':>9s} {'drop pts':>9s} {'b1 ms':>8s} "
          f"{'b32 ms':>8s} {'x b1':>6s} {'x b32':>6s}  decision")
    for preset, row in report["presets"].items():
        base = row["fp32"]
        print(f"{preset:15s} {'fp32':8s} {_fmt(base['size_bytes'], '8.1f', 1 / 1024)} "
              f"{_fmt(base['test_accuracy'], '8.2f', 100)}% {'':>9s} {_fmt(base['latency_ms_batch1'], '8.4f')} "
              f"{_fmt(base['latency_ms_batch32'], '8.4f')} {'':>6s} {'':>6s}  baseline")
        for name, v in row["variants"].items():
            numbers = v if v["built"] else v.get("measured_anyway", {})
            verdict = ("kept" if v["kept"] else "refused") if v["built"] else "not built"
            label = name if v["built"] else f"{name}*"
            print(f"{'':15s} {label:8s} {_fmt(numbers.get('size_bytes'), '8.1f', 1 / 1024)} "
                  f"{_fmt(numbers.get('test_accuracy'), '8.2f', 100)}% {_fmt(numbers.get('accuracy_drop'), '+9.2f')} "
                  f"{_fmt(numbers.get('latency_ms_batch1'), '8.4f')} {_fmt(numbers.get('latency_ms_batch32'), '8.4f')} "
                  f"{_fmt(numbers.get('speedup_batch1'), '6.2f')} {_fmt(numbers.get('speedup'), '6.2f')}  {verdict}")
    print("* not built by export on this machine (see the reason in the JSON); measured anyway, by the same checks.")
    print("x b1 / x b32: fp32 latency / variant latency at batch 1 / 32 (the gate reads batch 32), each against the "
          "fp32 runs alternated with that variant (the fp32 row shows the first variant's); ms: median of one "
          "ONNX Runtime run in-process, one intra-op thread.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=PRESETS, help="names under configs/ (without .yaml)")
    parser.add_argument("--epochs", type=int, default=None, help="cap every preset's epochs (default: its recipe)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of alternated fp32/variant runs per batch size (export uses 0.4)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the temporary projects here")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantize.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    missing = [p for p in args.presets if not (ROOT / "configs" / f"{p}.yaml").is_file()]
    if missing:
        parser.error(f"no such preset(s): {', '.join(missing)}; see configs/*.yaml")

    from pipelines.export.variants import SPEEDUP_BATCH
    from pipelines.settings import ExportSettings

    gate = ExportSettings()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fluxo-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "quantize",
        "machine": machine(),
        "commit": git_commit(),
        "uptime_at_start": uptime(),
        "epochs_cap": args.epochs,
        "timing_budget_s_per_batch_size": args.budget,
        "gate": {"max_accuracy_drop": gate.max_accuracy_drop, "min_speedup": gate.min_speedup,
                 "speedup_batch": SPEEDUP_BATCH},
        "presets": {},
    }
    started = time.perf_counter()
    projects: dict = {}
    for preset in args.presets:
        t = time.perf_counter()
        report["presets"][preset] = measure_preset(preset, work, args, projects)
        print(f"{preset}: trained {report['presets'][preset]['epochs_run']} epochs, measured in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    report["uptime_at_end"] = uptime()
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print_table(report)
    print(f"load: {report['uptime_at_start']}  →  {report['uptime_at_end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
