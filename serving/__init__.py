"""fluxo's REST service: BentoML on ONNX Runtime, fed from a model directory.

This package never imports ``pipelines`` or torch, so a serving image needs only
onnxruntime, numpy, pillow and bentoml. Importing it reads configuration and
nothing else; onnxruntime and bentoml load only in the modules that need them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MODEL_DIR_ENV = "FLUXO_MODEL_DIR"
API_KEY_ENV = "FLUXO_API_KEY"
API_KEY_FILE_ENV = "FLUXO_API_KEY_FILE"
ROLLOUT_ENV = "FLUXO_ROLLOUT"
CHALLENGER_DIR_ENV = "FLUXO_CHALLENGER_DIR"
CANARY_SHARE_ENV = "FLUXO_CANARY_SHARE"
SHADOW_SAMPLE_ENV = "FLUXO_SHADOW_SAMPLE"
ROLLOUT_MODES = ("champion", "shadow", "canary")
PAYLOAD_LOG_ENV = "FLUXO_PAYLOAD_LOG"
PAYLOAD_SAMPLE_ENV = "FLUXO_PAYLOAD_SAMPLE"
PAYLOAD_SPOOL_ENV = "FLUXO_PAYLOAD_SPOOL"
DRIFT_STATUS_ENV = "FLUXO_DRIFT_STATUS"


class ServingError(Exception):
    """A user-fixable serving problem: the message names the file, field or value and the fix.

    ``serving`` cannot import ``pipelines.errors.FluxoError``, so it has its own
    type; the CLI catches both the same way.
    """


def _env_number(name: str, default: float, minimum: float, kind: type, environ: Mapping[str, str]) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ServingError(
            f"environment variable {name}={raw!r}: expected {'an integer' if kind is int else 'a number'}, "
            f"for example {default}"
        ) from None
    if value < minimum:
        raise ServingError(f"environment variable {name}={value}: must be at least {minimum}")
    return value


def _env_fraction(name: str, default: float, environ: Mapping[str, str]) -> float:
    """A share between 0 and 1 (both included)."""
    value = _env_float(name, default, 0.0, environ)
    if not 0.0 <= value <= 1.0:  # also NaN
        raise ServingError(f"environment variable {name}={value}: must be between 0 and 1, for example {default}")
    return value


def _env_int(name: str, default: int, minimum: int, environ: Mapping[str, str]) -> int:
    return int(_env_number(name, default, minimum, int, environ))


def _env_float(name: str, default: float, minimum: float, environ: Mapping[str, str]) -> float:
    return float(_env_number(name, default, minimum, float, environ))


def _env_choice(name: str, default: str, choices: tuple[str, ...], environ: Mapping[str, str]) -> str:
    raw = environ.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ServingError(f"environment variable {name}={raw!r}: expected one of {', '.join(choices)}")
    return raw


def read_secret_file(variable: str, path: str | Path) -> str:
    """The secret in ``path`` without its trailing newline; ``variable`` names where the path came from.

    One reader for every ``*_FILE`` variable (compose and Kubernetes mount secrets as files):
    the service's API key here, MLflow's and Prefect's credentials in pipelines/secret_files.py.
    """
    where = f"{variable}={path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ServingError(f"{where}: no such file; create it (deploy/make-secrets.sh) or unset {variable}") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ServingError(f"{where}: cannot read it ({reason}); make it a readable UTF-8 text file") from None
    value = text.rstrip("\r\n")
    if not value.strip():
        raise ServingError(f"{where}: the file is empty; write the secret into it (deploy/make-secrets.sh)")
    return value


def _env_api_key(environ: Mapping[str, str]) -> str | None:
    """``FLUXO_API_KEY``, or the content of the file ``FLUXO_API_KEY_FILE`` names."""
    key, path = environ.get(API_KEY_ENV, ""), environ.get(API_KEY_FILE_ENV, "").strip()
    if not path:
        return key or None
    from_file = read_secret_file(API_KEY_FILE_ENV, path)
    if key and key != from_file:
        raise ServingError(f"both {API_KEY_ENV} and {API_KEY_FILE_ENV} are set, to different keys; unset one of them")
    return from_file


def _env_payload_log(environ: Mapping[str, str]) -> tuple[Path | None, str | None]:
    """``FLUXO_PAYLOAD_LOG``: (local directory written to, ``s3://`` URL sealed files go to, or None).

    For a URL the directory is the spool, ``FLUXO_PAYLOAD_SPOOL`` or one under the system's
    temporary directory named after the URL (serving/payload_store.py).
    """
    raw = environ.get(PAYLOAD_LOG_ENV, "").strip()
    if not raw:
        return None, None
    if "://" not in raw:
        return Path(raw), None
    if not raw.startswith("s3://") or not raw[len("s3://"):].strip("/"):
        raise ServingError(
            f"environment variable {PAYLOAD_LOG_ENV}={raw!r}: give a local directory or an s3://bucket/prefix URL "
            "(AWS_ENDPOINT_URL for MinIO and other S3-compatible stores)"
        )
    spool = environ.get(PAYLOAD_SPOOL_ENV, "").strip()
    if not spool:
        import re
        import tempfile

        name = re.sub(r"[^A-Za-z0-9._-]+", "_", raw[len("s3://"):].strip("/"))
        spool = str(Path(tempfile.gettempdir()) / "fluxo-payload-spool" / name)
    return Path(spool), raw


@dataclass(frozen=True)
class ServingConfig:
    """Every serving setting, read from ``FLUXO_*`` environment variables.

    The service runs in processes that BentoML spawns, so the environment is the
    one channel that reaches all of them; this class is the single home of the
    names and defaults. The defaults were chosen by measurement on a 2-core box
    (serving/README.md, "Choosing the settings").
    """

    model_dir: Path | None
    """``FLUXO_MODEL_DIR``: a model directory (model.onnx + metadata.json), or a model root whose
    ``current.json`` names the active one; only the latter is watched for hot reload."""
    workers: int = 2
    """``FLUXO_WORKERS``: server processes, each with its own session and batcher; 2 measured best on 2 cores."""
    ort_threads: int = 1
    """``FLUXO_ORT_THREADS``: ONNX Runtime intra-op threads per worker."""
    provider: str = "auto"
    """``FLUXO_PROVIDER``: ``auto`` (CUDA when a GPU and the CUDA provider exist, else CPU), ``cpu`` or
    ``cuda`` (refuse to start without it)."""
    variant: str = "auto"
    """``FLUXO_VARIANT``: which precision of the model runs: ``auto`` (the fastest variant export's gate kept for
    this provider, else fp32), ``fp32``, ``int8`` or ``fp16``; one that was not kept refuses to load, saying why."""
    max_batch_size: int = 32
    """``FLUXO_MAX_BATCH_SIZE``: most instances merged into one model run; 1 turns batching off."""
    batch_wait_ms: float = 0.0
    """``FLUXO_BATCH_WAIT_MS``: longest the first request of a batch waits for company while the model
    is idle. Requests that arrive while the model runs are merged anyway, so 0 adds no latency."""
    warmup_runs: int = 3
    """``FLUXO_WARMUP_RUNS``: runs of each warmup batch (1 row and ``FLUXO_MAX_BATCH_SIZE`` rows) a freshly
    loaded session makes before the server reports ready or a hot reload switches to it; 0 turns it off."""
    max_instances: int = 1024
    """``FLUXO_MAX_INSTANCES``: most instances (or image files) accepted in one request."""
    max_body_bytes: int = 4 * 1024 * 1024
    """``FLUXO_MAX_BODY_BYTES``: largest request body; larger ones answer 413 unread."""
    max_concurrency: int = 256
    """``FLUXO_MAX_CONCURRENCY``: requests in progress per worker before new ones answer 429."""
    timeout_s: float = 10.0
    """``FLUXO_TIMEOUT_S``: a request not answered within this many seconds answers 504."""
    api_key: str | None = None
    """``FLUXO_API_KEY``: when set, prediction routes need ``Authorization: Bearer <key>`` or
    ``X-API-Key: <key>``; health, readiness, metadata and metrics stay open. ``FLUXO_API_KEY_FILE``
    names a file holding the key instead (a compose or Kubernetes secret: not in the environment)."""
    reload_interval_s: float = 2.0
    """``FLUXO_RELOAD_INTERVAL_S``: how often a model root's ``current.json`` is checked; 0 turns it off."""
    trace_requests: bool = False
    """``FLUXO_TRACE_REQUESTS``: give prediction routes OpenTelemetry spans. Off by default: with no
    exporter configured the spans are dropped anyway, and creating them costs CPU on every request."""
    rollout: str = "champion"
    """``FLUXO_ROLLOUT``: ``champion`` (the champion answers everything), ``shadow`` (the challenger also runs
    on mirrored requests, off the response path, and is compared) or ``canary`` (a share of requests is
    answered by the challenger). serving/rollout.py."""
    challenger_dir: Path | None = None
    """``FLUXO_CHALLENGER_DIR``: the challenger's model directory or model root, like ``FLUXO_MODEL_DIR``
    and hot-reloaded on its own; a root whose ``current.json`` does not exist yet is watched until it does."""
    canary_share: float = 0.1
    """``FLUXO_CANARY_SHARE``: share of requests (0..1) the challenger answers in canary mode."""
    shadow_sample: float = 1.0
    """``FLUXO_SHADOW_SAMPLE``: share of requests (0..1) mirrored to the challenger in shadow mode."""

    payload_log: Path | None = None
    """``FLUXO_PAYLOAD_LOG``: the local directory the payload log is written to (serving/payload_log.py); off
    when unset. With an ``s3://bucket/prefix`` URL this is the spool (``FLUXO_PAYLOAD_SPOOL``) and sealed files
    are uploaded to :attr:`payload_upload`."""
    payload_upload: str | None = None
    """The ``s3://`` URL of ``FLUXO_PAYLOAD_LOG``, when it is one (serving/payload_store.py)."""
    payload_sample: float = 1.0
    """``FLUXO_PAYLOAD_SAMPLE``: share of answered requests (0..1) written to the payload log."""
    payload_rotate_mb: float = 64.0
    """``FLUXO_PAYLOAD_ROTATE_MB``: a payload file is sealed into ``.parquet`` once its journal is this big."""
    payload_rotate_s: float = 300.0
    """``FLUXO_PAYLOAD_ROTATE_S``: ... or once it is this old (seconds)."""
    payload_queue: int = 10_000
    """``FLUXO_PAYLOAD_QUEUE``: records waiting for the writer thread per worker; beyond, records are dropped."""
    payload_flush_s: float = 1.0
    """``FLUXO_PAYLOAD_FLUSH_S``: the writer appends what it has at least this often; a crash loses at most this."""
    drift_status: Path | None = None
    """``FLUXO_DRIFT_STATUS``: the JSON file ``fluxo monitor`` writes its verdict to; shown as the
    ``fluxo_drift_*`` gauges on /metrics (serving/drift_status.py). Unset: no drift gauges."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingConfig:
        """Read the settings; a malformed value raises :class:`ServingError` naming the variable.

        ``environ`` defaults to this process's; the launcher passes the one it is about
        to give the server, to refuse a bad value before spawning anything.
        """
        env = os.environ if environ is None else environ
        raw_dir = env.get(MODEL_DIR_ENV, "").strip()
        api_key = _env_api_key(env)
        raw_challenger = env.get(CHALLENGER_DIR_ENV, "").strip()
        payload_log, payload_upload = _env_payload_log(env)
        return cls(
            model_dir=Path(raw_dir) if raw_dir else None,
            workers=_env_int("FLUXO_WORKERS", cls.workers, 1, env),
            ort_threads=_env_int("FLUXO_ORT_THREADS", cls.ort_threads, 1, env),
            provider=_env_choice("FLUXO_PROVIDER", cls.provider, ("auto", "cpu", "cuda"), env),
            variant=_env_choice("FLUXO_VARIANT", cls.variant, ("auto", "fp32", "int8", "fp16"), env),
            max_batch_size=_env_int("FLUXO_MAX_BATCH_SIZE", cls.max_batch_size, 1, env),
            batch_wait_ms=_env_float("FLUXO_BATCH_WAIT_MS", cls.batch_wait_ms, 0.0, env),
            warmup_runs=_env_int("FLUXO_WARMUP_RUNS", cls.warmup_runs, 0, env),
            max_instances=_env_int("FLUXO_MAX_INSTANCES", cls.max_instances, 1, env),
            max_body_bytes=_env_int("FLUXO_MAX_BODY_BYTES", cls.max_body_bytes, 1024, env),
            max_concurrency=_env_int("FLUXO_MAX_CONCURRENCY", cls.max_concurrency, 1, env),
            timeout_s=_env_float("FLUXO_TIMEOUT_S", cls.timeout_s, 0.01, env),
            api_key=api_key,
            reload_interval_s=_env_float("FLUXO_RELOAD_INTERVAL_S", cls.reload_interval_s, 0.0, env),
            trace_requests=_env_choice("FLUXO_TRACE_REQUESTS", "0", ("0", "1", "false", "true"), env) in ("1", "true"),
            rollout=_env_choice(ROLLOUT_ENV, cls.rollout, ROLLOUT_MODES, env),
            challenger_dir=Path(raw_challenger) if raw_challenger else None,
            canary_share=_env_fraction(CANARY_SHARE_ENV, cls.canary_share, env),
            shadow_sample=_env_fraction(SHADOW_SAMPLE_ENV, cls.shadow_sample, env),
            payload_log=payload_log,
            payload_upload=payload_upload,
            payload_sample=_env_fraction(PAYLOAD_SAMPLE_ENV, cls.payload_sample, env),
            payload_rotate_mb=_env_float("FLUXO_PAYLOAD_ROTATE_MB", cls.payload_rotate_mb, 0.001, env),
            payload_rotate_s=_env_float("FLUXO_PAYLOAD_ROTATE_S", cls.payload_rotate_s, 0.01, env),
            payload_queue=_env_int("FLUXO_PAYLOAD_QUEUE", cls.payload_queue, 1, env),
            payload_flush_s=_env_float("FLUXO_PAYLOAD_FLUSH_S", cls.payload_flush_s, 0.01, env),
            drift_status=Path(env[DRIFT_STATUS_ENV].strip()) if env.get(DRIFT_STATUS_ENV, "").strip() else None,
        )

    def require_model_dir(self) -> Path:
        """The model directory (or root), or a :class:`ServingError` saying how to set it."""
        if self.model_dir is None:
            raise ServingError(
                f"{MODEL_DIR_ENV} is not set: point it at a directory with model.onnx and "
                "metadata.json (written by the export step), or start the service with `fluxo serve`"
            )
        return self.model_dir


__all__ = [
    "API_KEY_ENV", "API_KEY_FILE_ENV", "CANARY_SHARE_ENV", "CHALLENGER_DIR_ENV", "DRIFT_STATUS_ENV", "MODEL_DIR_ENV", "PAYLOAD_LOG_ENV", "PAYLOAD_SAMPLE_ENV", "PAYLOAD_SPOOL_ENV", "ROLLOUT_ENV", "ROLLOUT_MODES",
    "SHADOW_SAMPLE_ENV", "ServingConfig", "ServingError", "read_secret_file",
]
