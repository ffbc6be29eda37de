# syntax=docker/dockerfile:1
# dlpipe serving image: `dlpipe serve` on ONNX Runtime, without torch (the package is installed with
# --no-deps, then only the `serve` extra of pyproject.toml and one onnxruntime build).
#
# Build from the repository root:
#   CPU (default):  docker build -f docker/serve.Dockerfile -t dlpipe-serve:cpu .
#   GPU:            docker build -f docker/serve.Dockerfile -t dlpipe-serve:cuda \
#                     --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 --build-arg ONNXRUNTIME=onnxruntime-gpu .
# Run against an MLflow server (models:/dlpipe-<model>@champion):
#   docker run --rm -p 127.0.0.1:8000:8000 -e MLFLOW_TRACKING_URI=http://mlflow:5000 dlpipe-serve:cpu
# Or serve files:   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/models:/models:ro" dlpipe-serve:cpu \
#                     dlpipe serve --host 0.0.0.0 --file cnn=/models/cnn/model.onnx
# With --gpus all the CUDA provider is used when onnxruntime-gpu finds the GPU; GET /v1/models says which.

ARG BASE=python:3.11-slim
FROM ${BASE}

ARG ONNXRUNTIME=onnxruntime
ARG APP_UID=10001

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 from the deadsnakes PPA where the base (a CUDA image on Ubuntu 24.04) lacks it.
RUN set -eux; \
    if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends ca-certificates gnupg software-properties-common; \
        add-apt-repository -y ppa:deadsnakes/ppa; \
        apt-get update; \
        apt-get install -y --no-install-recommends python3.11 python3.11-venv; \
        apt-get purge -y --auto-remove software-properties-common gnupg; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3.11 -m venv /opt/venv; \
    /opt/venv/bin/pip install --upgrade pip

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv

WORKDIR /app

COPY pyproject.toml constraints.txt README.md ./
COPY src/ src/
# The serve extra's requirements, read from pyproject.toml (one list to keep up to date), then a check
# that the service imports and loads without torch.
RUN set -eux; \
    pip install --no-deps .; \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['serve']))" > /tmp/serve.txt; \
    pip install -c constraints.txt -r /tmp/serve.txt "${ONNXRUNTIME}"; \
    python -c "import sys, dlpipe.serving.app, dlpipe.serving.cli; assert 'torch' not in sys.modules, 'serving imported torch'"

COPY params.yaml ./

RUN useradd --create-home --uid "${APP_UID}" --user-group --shell /usr/sbin/nologin dlpipe
USER dlpipe

ENV DLPIPE_PARAMS=/app/params.yaml

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["dlpipe", "serve", "--host", "0.0.0.0", "--port", "8000"]
