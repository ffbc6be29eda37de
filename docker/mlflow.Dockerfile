# syntax=docker/dockerfile:1
# MLflow tracking server: PostgreSQL backend store (psycopg2), S3-compatible artifact store (boto3).
# The command line (stores, host, allowed hosts) is set in compose.yaml.
#   docker build -f docker/mlflow.Dockerfile -t dlpipe-mlflow docker/

FROM python:3.11-slim

# Keep the server at least as new as the mlflow client dlpipe installs (`pip show mlflow`).
ARG MLFLOW_VERSION=3.17.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" "boto3>=1.34" \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin mlflow

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000

# /health is exempt from MLflow's Host-header check, so it answers from inside the container.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]

CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
