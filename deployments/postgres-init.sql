-- Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d),
-- as POSTGRES_USER, who therefore owns these databases. POSTGRES_DB already created
-- `visionloop` (the platform's own tables); each server that keeps state gets its own
-- database so their migrations never meet:
CREATE DATABASE mlflow;       -- MLflow backend store (experiments, runs, model registry)
CREATE DATABASE prefect;      -- Prefect server (flow runs, deployments, schedules, logs)
CREATE DATABASE labelstudio;  -- Label Studio (projects, tasks, annotations, users)
