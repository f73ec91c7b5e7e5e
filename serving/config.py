"""Every serving setting in one place: :class:`ServingConfig`, and the ``FLUXO_*`` environment that carries it.

The service runs in processes that BentoML spawns, so the environment is the one channel
that reaches all of them: whoever starts a server builds a ServingConfig (``fluxo serve``
from its settings, pipelines/settings ``ServeSettings.serving_config``), :meth:`ServingConfig.to_env`
turns it into variables, and each worker reads them back with :meth:`ServingConfig.from_env`.
The names and defaults live here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path

from serving.errors import ServingError

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

    For a URL the directory is the spool, ``FLUXO_PAYLOAD_SPOOL`` or one named after the URL
    under this user's ``$XDG_STATE_HOME/fluxo/payload-spool`` (serving/payload_store.py).
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

        # Per user, not in the shared temporary folder: there another user can make the folder first,
        # read what clients sent, or slip files in that get uploaded. The logger makes it mode 0700.
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", raw[len("s3://"):].strip("/"))
        state = environ.get("XDG_STATE_HOME", "").strip() or str(Path.home() / ".local" / "state")
        spool = str(Path(state) / "fluxo" / "payload-spool" / name)
    return Path(spool), raw


def _setting(env: str, kind: type, *, minimum: float | None = None, maximum: float | None = None,
             choices: tuple[str, ...] | None = None) -> dict[str, object]:
    """A field's variable and how its text is read and checked (:func:`_read`); :meth:`ServingConfig.to_env` inverts it."""
    return {"env": env, "kind": kind, "minimum": minimum, "maximum": maximum, "choices": choices}


def _read(item: Field, environ: Mapping[str, str]) -> object:
    meta, default = item.metadata, item.default
    if meta["kind"] is bool:
        return _env_choice(meta["env"], "1" if default else "0", ("0", "1", "false", "true"), environ) in ("1", "true")
    if meta["choices"] is not None:
        return _env_choice(meta["env"], default, meta["choices"], environ)
    if meta["maximum"] is not None:
        return _env_fraction(meta["env"], default, environ)
    if meta["kind"] is int:
        return _env_int(meta["env"], default, meta["minimum"], environ)
    return _env_float(meta["env"], default, meta["minimum"], environ)


def _written(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _env_path(name: str, environ: Mapping[str, str]) -> Path | None:
    raw = environ.get(name, "").strip()
    return Path(raw) if raw else None


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
    workers: int = field(default=2, metadata=_setting('FLUXO_WORKERS', int, minimum=1))
    """``FLUXO_WORKERS``: server processes, each with its own session and batcher; 2 measured best on 2 cores."""
    ort_threads: int = field(default=1, metadata=_setting('FLUXO_ORT_THREADS', int, minimum=1))
    """``FLUXO_ORT_THREADS``: ONNX Runtime intra-op threads per worker."""
    provider: str = field(default="auto", metadata=_setting('FLUXO_PROVIDER', str, choices=('auto', 'cpu', 'cuda')))
    """``FLUXO_PROVIDER``: ``auto`` (CUDA when a GPU and the CUDA provider exist, else CPU), ``cpu`` or
    ``cuda`` (refuse to start without it)."""
    variant: str = field(default="auto", metadata=_setting('FLUXO_VARIANT', str, choices=('auto', 'fp32', 'int8', 'fp16')))
    """``FLUXO_VARIANT``: which precision of the model runs: ``auto`` (the fastest variant export's gate kept for
    this provider, else fp32), ``fp32``, ``int8`` or ``fp16``; one that was not kept refuses to load, saying why."""
    max_batch_size: int = field(default=32, metadata=_setting('FLUXO_MAX_BATCH_SIZE', int, minimum=1))
    """``FLUXO_MAX_BATCH_SIZE``: most instances merged into one model run; 1 turns batching off."""
    batch_wait_ms: float = field(default=0.0, metadata=_setting('FLUXO_BATCH_WAIT_MS', float, minimum=0.0))
    """``FLUXO_BATCH_WAIT_MS``: longest the first request of a batch waits for company while the model
    is idle. Requests that arrive while the model runs are merged anyway, so 0 adds no latency."""
    warmup_runs: int = field(default=3, metadata=_setting('FLUXO_WARMUP_RUNS', int, minimum=0))
    """``FLUXO_WARMUP_RUNS``: runs of each warmup batch (1 row and ``FLUXO_MAX_BATCH_SIZE`` rows) a freshly
    loaded session makes before the server reports ready or a hot reload switches to it; 0 turns it off."""
    max_instances: int = field(default=1024, metadata=_setting('FLUXO_MAX_INSTANCES', int, minimum=1))
    """``FLUXO_MAX_INSTANCES``: most instances (or image files) accepted in one request."""
    max_body_bytes: int = field(default=4 * 1024 * 1024, metadata=_setting('FLUXO_MAX_BODY_BYTES', int, minimum=1024))
    """``FLUXO_MAX_BODY_BYTES``: largest request body; larger ones answer 413 unread."""
    max_concurrency: int = field(default=256, metadata=_setting('FLUXO_MAX_CONCURRENCY', int, minimum=1))
    """``FLUXO_MAX_CONCURRENCY``: requests in progress per worker before new ones answer 429."""
    timeout_s: float = field(default=10.0, metadata=_setting('FLUXO_TIMEOUT_S', float, minimum=0.01))
    """``FLUXO_TIMEOUT_S``: a request not answered within this many seconds answers 504."""
    api_key: str | None = None
    """``FLUXO_API_KEY``: when set, prediction routes need ``Authorization: Bearer <key>`` or
    ``X-API-Key: <key>``; health, readiness, metadata and metrics stay open. ``FLUXO_API_KEY_FILE``
    names a file holding the key instead (a compose or Kubernetes secret: not in the environment)."""
    api_key_file: Path | None = None
    """``FLUXO_API_KEY_FILE``: where :attr:`api_key` was read from; handed on as the path, so the key itself
    never lands in a worker's environment."""
    reload_interval_s: float = field(default=2.0, metadata=_setting('FLUXO_RELOAD_INTERVAL_S', float, minimum=0.0))
    """``FLUXO_RELOAD_INTERVAL_S``: how often a model root's ``current.json`` is checked; 0 turns it off."""
    trace_requests: bool = field(default=False, metadata=_setting("FLUXO_TRACE_REQUESTS", bool))
    """``FLUXO_TRACE_REQUESTS``: give prediction routes OpenTelemetry spans. Off by default: with no
    exporter configured the spans are dropped anyway, and creating them costs CPU on every request."""
    rollout: str = field(default="champion", metadata=_setting(ROLLOUT_ENV, str, choices=ROLLOUT_MODES))
    """``FLUXO_ROLLOUT``: ``champion`` (the champion answers everything), ``shadow`` (the challenger also runs
    on mirrored requests, off the response path, and is compared) or ``canary`` (a share of requests is
    answered by the challenger). serving/rollout.py."""
    challenger_dir: Path | None = None
    """``FLUXO_CHALLENGER_DIR``: the challenger's model directory or model root, like ``FLUXO_MODEL_DIR``
    and hot-reloaded on its own; a root whose ``current.json`` does not exist yet is watched until it does."""
    canary_share: float = field(default=0.1, metadata=_setting(CANARY_SHARE_ENV, float, minimum=0.0, maximum=1.0))
    """``FLUXO_CANARY_SHARE``: share of requests (0..1) the challenger answers in canary mode."""
    shadow_sample: float = field(default=1.0, metadata=_setting(SHADOW_SAMPLE_ENV, float, minimum=0.0, maximum=1.0))
    """``FLUXO_SHADOW_SAMPLE``: share of requests (0..1) mirrored to the challenger in shadow mode."""
    max_request_pixels: int = field(default=4096 * 4096, metadata=_setting('FLUXO_MAX_REQUEST_PIXELS', int, minimum=1))
    """``FLUXO_MAX_REQUEST_PIXELS``: most pixels the images of one request may decode to, all files together
    (read from their headers before any is decoded; beyond, 413). A few kilobytes of blank PNG can declare
    16 million pixels, so the body limit alone does not bound the work (serving/image_work.py)."""
    image_threads: int = field(default=1, metadata=_setting('FLUXO_IMAGE_THREADS', int, minimum=1))
    """``FLUXO_IMAGE_THREADS``: threads per worker that decode large uploads (small ones decode inline)."""
    image_queue_pixels: int = field(default=2 * 4096 * 4096,
                                    metadata=_setting('FLUXO_IMAGE_QUEUE_PIXELS', int, minimum=1))
    """``FLUXO_IMAGE_QUEUE_PIXELS``: pixels queued or being decoded per worker beyond which a new image
    request answers 429 at once, rather than waiting to time out (serving/image_work.py)."""
    report_public: bool = field(default=False, metadata=_setting('FLUXO_REPORT_PUBLIC', bool))
    """``FLUXO_REPORT_PUBLIC``: with an API key set, ``GET /report`` (which shows test samples) needs the key
    too unless this is on. Without a key everything is open anyway."""

    payload_log: Path | None = None
    """``FLUXO_PAYLOAD_LOG``: the local directory the payload log is written to (serving/payload_log.py); off
    when unset. With an ``s3://bucket/prefix`` URL this is the spool (``FLUXO_PAYLOAD_SPOOL``) and sealed files
    are uploaded to :attr:`payload_upload`."""
    payload_upload: str | None = None
    """The ``s3://`` URL of ``FLUXO_PAYLOAD_LOG``, when it is one (serving/payload_store.py)."""
    payload_sample: float = field(default=1.0, metadata=_setting(PAYLOAD_SAMPLE_ENV, float, minimum=0.0, maximum=1.0))
    """``FLUXO_PAYLOAD_SAMPLE``: share of answered requests (0..1) written to the payload log."""
    payload_rotate_mb: float = field(default=64.0, metadata=_setting('FLUXO_PAYLOAD_ROTATE_MB', float, minimum=0.001))
    """``FLUXO_PAYLOAD_ROTATE_MB``: a payload file is sealed into ``.parquet`` once its journal is this big."""
    payload_rotate_s: float = field(default=300.0, metadata=_setting('FLUXO_PAYLOAD_ROTATE_S', float, minimum=0.01))
    """``FLUXO_PAYLOAD_ROTATE_S``: ... or once it is this old (seconds)."""
    payload_queue: int = field(default=10_000, metadata=_setting('FLUXO_PAYLOAD_QUEUE', int, minimum=1))
    """``FLUXO_PAYLOAD_QUEUE``: records waiting for the writer thread per worker; beyond, records are dropped."""
    payload_queue_mb: float = field(default=64.0, metadata=_setting('FLUXO_PAYLOAD_QUEUE_MB', float, minimum=0.001))
    """``FLUXO_PAYLOAD_QUEUE_MB``: MiB of records (their arrays) waiting for the writer per worker; beyond, records
    are dropped and counted. With records of up to a request body each, the record count alone bounds nothing."""
    payload_keep_days: float = field(default=30.0, metadata=_setting('FLUXO_PAYLOAD_KEEP_DAYS', float, minimum=0.0))
    """``FLUXO_PAYLOAD_KEEP_DAYS``: payload files older than this are deleted from the local log or spool
    (uploaded ones live on in the bucket, under its own expiry); 0 keeps them forever."""
    payload_keep_mb: float = field(default=10_240.0, metadata=_setting('FLUXO_PAYLOAD_KEEP_MB', float, minimum=0.0))
    """``FLUXO_PAYLOAD_KEEP_MB``: the local log or spool is kept under this many MiB by deleting its oldest
    finished files (in a spool: files the store has not taken yet, counted as expired); 0: no cap."""
    payload_flush_s: float = field(default=1.0, metadata=_setting('FLUXO_PAYLOAD_FLUSH_S', float, minimum=0.01))
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
        payload_log, payload_upload = _env_payload_log(env)
        api_key_file = env.get(API_KEY_FILE_ENV, "").strip()
        values = {item.name: _read(item, env) for item in fields(cls) if "env" in item.metadata}
        return cls(
            model_dir=_env_path(MODEL_DIR_ENV, env),
            challenger_dir=_env_path(CHALLENGER_DIR_ENV, env),
            drift_status=_env_path(DRIFT_STATUS_ENV, env),
            api_key=_env_api_key(env),
            api_key_file=Path(api_key_file) if api_key_file else None,
            payload_log=payload_log,
            payload_upload=payload_upload,
            **values,
        )

    @classmethod
    def for_model_dir(cls, model_dir: Path | str, **changes: object) -> ServingConfig:
        """This process's ``FLUXO_*`` settings (the operator's tuning) serving ``model_dir``, with ``changes``."""
        return replace(cls.from_env(), model_dir=Path(model_dir), **changes)

    def with_payload_log(self, target: str | None) -> ServingConfig:
        """This config logging payloads to ``target`` (a directory or ``s3://`` URL), read exactly as
        ``FLUXO_PAYLOAD_LOG`` would be (the spool of a URL: ``FLUXO_PAYLOAD_SPOOL`` or its default)."""
        if target is None:
            return self
        payload_log, payload_upload = _env_payload_log({**os.environ, PAYLOAD_LOG_ENV: target})
        return replace(self, payload_log=payload_log, payload_upload=payload_upload)

    def to_env(self) -> dict[str, str]:
        """The ``FLUXO_*`` variables that :meth:`from_env` reads back as this same config (unset fields omitted)."""
        env = {item.metadata["env"]: _written(getattr(self, item.name)) for item in fields(self) if "env" in item.metadata}
        for variable, path in ((MODEL_DIR_ENV, self.model_dir), (CHALLENGER_DIR_ENV, self.challenger_dir),
                               (DRIFT_STATUS_ENV, self.drift_status)):
            if path is not None:
                env[variable] = str(Path(path).resolve())
        if self.api_key_file is not None:
            env[API_KEY_FILE_ENV] = str(self.api_key_file)
        elif self.api_key:
            env[API_KEY_ENV] = self.api_key
        if self.payload_upload:
            env[PAYLOAD_LOG_ENV] = self.payload_upload
            if self.payload_log is not None:
                env[PAYLOAD_SPOOL_ENV] = str(Path(self.payload_log).resolve())
        elif self.payload_log is not None:
            env[PAYLOAD_LOG_ENV] = str(Path(self.payload_log).resolve())
        return env

    def require_model_dir(self) -> Path:
        """The model directory (or root), or a :class:`ServingError` saying how to set it."""
        if self.model_dir is None:
            raise ServingError(
                f"{MODEL_DIR_ENV} is not set: point it at a directory with model.onnx and "
                "metadata.json (written by the export step), or start the service with `fluxo serve`"
            )
        return self.model_dir
