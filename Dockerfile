# The fluxo app image: one image, two roles in docker-compose.yml.
#   worker   fluxo schedule --cron "..."        (Prefect-served pipeline, runs the flows itself)
#   serving  fluxo serve --host 0.0.0.0 --port 3000
# Every setting comes from the environment (FLUXO_*, MLFLOW_TRACKING_URI, PREFECT_API_URL,
# AWS_*), so the same image runs anywhere. Secrets come as files at run time, never baked in:
# MLFLOW_TRACKING_PASSWORD_FILE, PREFECT_API_AUTH_STRING_FILE, FLUXO_API_KEY_FILE and
# AWS_SHARED_CREDENTIALS_FILE (.dockerignore keeps deploy/secrets/ out of the build context).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch from its CPU index: torch==2.13.0+cpu satisfies the project's torch==2.13.0 pin
# (and sorts above the PyPI build, so pip picks it) without the CUDA libraries.
# Everything else still comes from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# DVC shells out to git for repositories that have one; the image has no .git
# (see .dockerignore), so the app initialises DVC with --no-scm, but keep git for
# bind-mounted checkouts that do. git follows the Debian release of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 fluxo

WORKDIR /app

# Dependencies first, read from pyproject.toml itself (no second list to keep in step),
# so that a code change does not reinstall torch.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# data/ and .fluxo/ are named volumes in compose; a fresh volume takes this ownership.
COPY . .
RUN pip install --no-deps . \
    && mkdir -p data .fluxo \
    && chown -R fluxo:fluxo /app

USER 1000:1000
EXPOSE 3000

ENTRYPOINT ["fluxo"]
CMD ["--help"]
