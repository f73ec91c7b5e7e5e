#!/bin/sh
# docker-compose.yml's one-shot `postgres-init`: a login role per app (MLflow, Prefect) with the
# password in its secret file, and a database per store owned by its app's role that no other role
# may connect to. Idempotent; it sets each role's password from its file on every `up`, so
# rotating one is a new file and `docker compose up -d` (deploy/README.md).
# Passwords reach psql on its standard input, never on a command line.
set -eu
for secret in postgres_password postgres_mlflow_password postgres_prefect_password; do
    test -s "/run/secrets/$secret" || {
        echo "error: secret $secret is missing or empty; run deploy/make-secrets.sh" >&2
        exit 1
    }
done
PGPASSWORD="$(cat /run/secrets/postgres_password)"
export PGPASSWORD
{
    echo "\\set mlflow_pw '$(cat /run/secrets/postgres_mlflow_password)'"
    echo "\\set prefect_pw '$(cat /run/secrets/postgres_prefect_password)'"
    cat <<SQL
SELECT format('CREATE ROLE %I LOGIN', r) FROM unnest(ARRAY['$MLFLOW_DB_USER', '$PREFECT_DB_USER']) AS r
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) \gexec
ALTER ROLE "$MLFLOW_DB_USER" PASSWORD :'mlflow_pw';
ALTER ROLE "$PREFECT_DB_USER" PASSWORD :'prefect_pw';
SELECT format('CREATE DATABASE %I', d) FROM unnest(ARRAY['$MLFLOW_DB', '$MLFLOW_AUTH_DB', '$PREFECT_DB']) AS d
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = d) \gexec
ALTER DATABASE "$MLFLOW_DB" OWNER TO "$MLFLOW_DB_USER";
ALTER DATABASE "$MLFLOW_AUTH_DB" OWNER TO "$MLFLOW_DB_USER";
ALTER DATABASE "$PREFECT_DB" OWNER TO "$PREFECT_DB_USER";
REVOKE ALL ON DATABASE "$MLFLOW_DB", "$MLFLOW_AUTH_DB", "$PREFECT_DB" FROM PUBLIC;
SQL
} | psql -v ON_ERROR_STOP=1 -q -d postgres
for db in "$MLFLOW_DB" "$MLFLOW_AUTH_DB"; do
    psql -v ON_ERROR_STOP=1 -q -d "$db" -c "ALTER SCHEMA public OWNER TO \"$MLFLOW_DB_USER\""
done
psql -v ON_ERROR_STOP=1 -q -d "$PREFECT_DB" -c "ALTER SCHEMA public OWNER TO \"$PREFECT_DB_USER\""
echo "roles $MLFLOW_DB_USER, $PREFECT_DB_USER; databases $MLFLOW_DB, $MLFLOW_AUTH_DB ($MLFLOW_DB_USER), $PREFECT_DB ($PREFECT_DB_USER)"
