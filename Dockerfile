# The fluxo app images, two targets of one file:
#   fluxo          (target full)     worker: fluxo schedule --cron "..." (trains; torch, Prefect) in /project
#                                    and the Prefect server of the stack (same Prefect as the worker)
#   fluxo-serving  (target serving)  serving: fluxo serve (ONNX Runtime; no torch, no Prefect)
# Every setting comes from the environment (FLUXO_*, MLFLOW_TRACKING_URI, PREFECT_API_URL,
# AWS_*), so the same image runs anywhere. Secrets come as files at run time, never baked in:
# MLFLOW_TRACKING_PASSWORD_FILE, PREFECT_API_AUTH_STRING_FILE, FLUXO_API_KEY_FILE and
# AWS_SHARED_CREDENTIALS_FILE (.dockerignore keeps deploy/secrets/ out of the build context).
#
# BASE_IMAGE: a Debian-based image with Python 3.11 and its venv module. Where images can be
# pulled it is the pinned python image below; where none can (deploy/images/base.sh) it is a
# local Debian made with debootstrap. `make images` picks.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# DVC shells out to git for repositories that have one; the image has no .git (.dockerignore),
# so the app initialises DVC with --no-scm, but keep git for bind-mounted checkouts that do.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 fluxo \
    && python3 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade "pip>=24"
# The dependency list is pyproject.toml's own; the versions are constraints.txt's.
COPY pyproject.toml deploy/constraints.txt deploy/images/requirements.py /opt/fluxo-build/
WORKDIR /app

# ---- serving: what `fluxo serve` imports, and nothing that only trains, tunes or schedules.
# MLflow's client without its server (mlflow-skinny: no scikit-learn, SciPy, matplotlib or UI) and
# ONNX Runtime's CPU build at the GPU build's version (the replicas run on CPUs; 24 MB, not 340 MB).
FROM runtime AS serving
RUN python /opt/fluxo-build/requirements.py /opt/fluxo-build/pyproject.toml \
        --without torch prefect optuna mnist1d mlxtend onnxscript hyppo dvc mlflow onnxruntime-gpu \
        > /tmp/requirements.txt \
    && echo "mlflow-skinny" >> /tmp/requirements.txt \
    && echo "onnxruntime==$(sed -n 's/^onnxruntime-gpu==//p' /opt/fluxo-build/constraints.txt)" >> /tmp/requirements.txt \
    && pip install -c /opt/fluxo-build/constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# The code belongs to root: the runtime user cannot rewrite what it runs.
COPY . /app
RUN pip install --no-deps /app \
    && mkdir -p /app/.fluxo \
    && chown fluxo:fluxo /app/.fluxo
USER 1000:1000
EXPOSE 3000
ENTRYPOINT ["fluxo"]
CMD ["serve", "--host", "0.0.0.0", "--port", "3000"]

# ---- full: the worker (training, export, monitor, Prefect).
FROM runtime AS full
# torch from PyTorch's CPU index and from nothing else (no --extra-index-url for every package):
# pyproject's torch pin, which that index answers with its +cpu build (no CUDA libraries). Where
# that index is out of reach, `make images` serves the wheel found on this machine as an index
# of its own (TORCH_TRUSTED_HOST names it, as it speaks plain HTTP on the build bridge).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_TRUSTED_HOST=
# --no-deps: torch's own dependencies (filelock, sympy, ...) come from PyPI with the rest, next.
RUN pip install --no-deps --index-url "${TORCH_INDEX_URL}" ${TORCH_TRUSTED_HOST:+--trusted-host "$TORCH_TRUSTED_HOST"} \
        "$(python /opt/fluxo-build/requirements.py /opt/fluxo-build/pyproject.toml --only torch)"
RUN python /opt/fluxo-build/requirements.py /opt/fluxo-build/pyproject.toml > /tmp/requirements.txt \
    && pip install -c /opt/fluxo-build/constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY . /app
# The worker's project is /project, not the code: DVC's .dvc/ and data.dvc, data/ and .fluxo/
# (checkpoints, exports) live there, on one named volume in compose (a fresh volume takes this
# ownership); the code in /app stays root's.
RUN pip install --no-deps /app \
    && mkdir -p /project \
    && chown fluxo:fluxo /project
WORKDIR /project
USER 1000:1000
EXPOSE 3000
ENTRYPOINT ["fluxo"]
CMD ["--help"]
