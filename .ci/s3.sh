# Sourced by .ci/run: an S3-compatible server (moto's server mode) on loopback for the blob store tests.
# Exports SUBJECTPAINT_TEST_S3_URL (a bucket URL for the tests) and the endpoint and credentials s3fs reads.
python3 -m venv /tmp/subjectpaint-moto >/dev/null
/tmp/subjectpaint-moto/bin/pip install -q "moto[server]>=5,<6"
S3_PORT=${S3_PORT:-5055}
_s3_up() { python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$S3_PORT/moto-api/', timeout=2)" 2>/dev/null; }
if ! _s3_up; then
  /tmp/subjectpaint-moto/bin/moto_server -H 127.0.0.1 -p "$S3_PORT" >/tmp/subjectpaint-moto.log 2>&1 &
  for _ in $(seq 1 150); do _s3_up && break; sleep 0.2; done
  _s3_up || { echo "CI: moto server did not start (see /tmp/subjectpaint-moto.log)" >&2; return 1; }
fi
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export SUBJECTPAINT_TEST_S3_URL="s3://subjectpaint-test"
echo "CI: S3-compatible server (moto) on 127.0.0.1:$S3_PORT for the blob store tests"
