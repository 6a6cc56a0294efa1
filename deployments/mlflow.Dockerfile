# MLflow tracking server + model registry for the production stack (see docker-compose.yml).
# The upstream MLflow image lacks what this setup needs: boto3 to proxy artifacts to the S3
# bucket (without it artifact uploads fail with HTTP 500) and psycopg2 for the PostgreSQL
# backend store. mlflow is pinned to the version the project's clients use (uv.lock).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN pip install --no-cache-dir \
        "mlflow==3.17.2" \
        "boto3==1.44.5" \
        "psycopg2-binary==2.9.13"

# The server keeps no local state (metadata in PostgreSQL, artifacts in S3): run unprivileged.
RUN groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid mlflow --create-home --home-dir /home/mlflow mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
# The full command line (backend store, artifact destination, allowed hosts) is set in
# docker-compose.yml, next to the services it points at.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
