# Sourced by .ci/run: a real PostgreSQL server on loopback for the registry tests.
# Idempotent; needs root (CI runs as root). Exports SUBJECTPAINT_TEST_PG_URL.
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
PGVER=$(ls /usr/lib/postgresql | sort -V | tail -1)
pg_lsclusters -h | grep -q "^$PGVER main" || pg_createcluster "$PGVER" main
pg_ctlcluster "$PGVER" main status >/dev/null 2>&1 || pg_ctlcluster "$PGVER" main start
pg_isready -h 127.0.0.1 -p 5432 -t 60
su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='sp'\"" | grep -q 1 \
  || su postgres -c "psql -v ON_ERROR_STOP=1 -c \"CREATE USER sp WITH PASSWORD 'sp'\""
su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='sp_test'\"" | grep -q 1 \
  || su postgres -c "psql -v ON_ERROR_STOP=1 -c 'CREATE DATABASE sp_test OWNER sp'"
export SUBJECTPAINT_TEST_PG_URL=postgresql+psycopg://sp:sp@127.0.0.1:5432/sp_test
echo "CI: PostgreSQL $PGVER on 127.0.0.1:5432 for the registry tests"
