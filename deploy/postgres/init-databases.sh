#!/bin/bash
# First-start initialisation of the PostgreSQL used by landscape-sweeps (run once by the official
# postgres image from /docker-entrypoint-initdb.d, in docker compose and in Kubernetes).
#
# Two least-privilege roles, passwords from the environment (Secrets / .env, never this file):
#   mlflow  owns databases "mlflow" (runs, params, metrics) and "mlflow_auth" (basic-auth users);
#           only the MLflow server connects as this role.
#   optuna  owns database "optuna" (the Optuna studies); the sweep driver connects as this role.
set -euo pipefail
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD (password of the mlflow database role)}"
: "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD (password of the optuna database role)}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" -v optuna_password="$OPTUNA_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE ROLE optuna LOGIN PASSWORD :'optuna_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE optuna OWNER optuna;
REVOKE ALL ON DATABASE mlflow, mlflow_auth, optuna FROM PUBLIC;
SQL
