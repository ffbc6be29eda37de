# syntax=docker/dockerfile:1
# dlpipe training image: the package, the pipeline definition and the committed data samples.
#
# Build from the repository root (the build context must be the root, not docker/):
#   GPU (default):  docker build -f docker/train.Dockerfile -t dlpipe-train:cuda .
#   CPU only:       docker build -f docker/train.Dockerfile -t dlpipe-train:cpu \
#                     --build-arg BASE=python:3.11-slim --build-arg ONNX_EXTRA=cpu \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Run once:         docker run --rm --gpus all dlpipe-train:cuda      (python -m pipelines.flows)
#
# The image has no git checkout: it is a DVC project without git (`dvc init --no-scm`), and its default
# command is the Prefect flow, which runs the DVC stages (`dvc repro` in the image does the same).

ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}

# gpu -> onnxruntime-gpu (CUDA 12 / cuDNN 9, falls back to the CPU provider); cpu -> onnxruntime.
ARG ONNX_EXTRA=gpu
# Extra package index for torch. Empty: PyPI's default Linux wheel (a CUDA build). For a given CUDA
# flavour use e.g. https://download.pytorch.org/whl/cu128, for a small CPU image .../whl/cpu.
ARG TORCH_INDEX_URL=
ARG APP_UID=10001
# Where runs are recorded; override at build time or with `docker run -e MLFLOW_TRACKING_URI=...`.
ARG MLFLOW_TRACKING_URI=sqlite:////app/mlflow.db

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11: already present in python:3.11-slim; from the deadsnakes PPA on Ubuntu 24.04 (whose
# system Python is 3.12).
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
    /opt/venv/bin/pip install --upgrade pip setuptools wheel

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv

WORKDIR /app

# Dependencies and the package (src/ changes invalidate this layer; the data and pipeline files below do not).
COPY pyproject.toml constraints.txt README.md ./
COPY src/ src/
RUN set -eux; \
    pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c constraints.txt ".[${ONNX_EXTRA},servers]"; \
    python -c "import dlpipe, torch, onnxruntime; print('torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"

COPY pipelines/ pipelines/
COPY params.yaml dvc.yaml prefect.yaml ./
COPY data/samples/ data/samples/

# Non-root user; it owns /app because every stage writes data/, models/, reports/ and mlflow.db there.
RUN set -eux; \
    useradd --create-home --uid "${APP_UID}" --user-group --shell /usr/sbin/nologin dlpipe; \
    mkdir -p data/images data/stocks data/cache models reports; \
    chown -R dlpipe:dlpipe /app

USER dlpipe

# The flow runs the DVC stages: the image is a DVC project of its own (no git inside the image).
RUN dvc init --no-scm -q && dvc config core.analytics false

ENV NO_ALBUMENTATIONS_UPDATE=1 \
    GIT_PYTHON_REFRESH=quiet \
    CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    DLPIPE_PARAMS=/app/params.yaml \
    MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI}

CMD ["python", "-m", "pipelines.flows"]
