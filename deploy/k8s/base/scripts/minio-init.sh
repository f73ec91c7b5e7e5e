#!/bin/sh
# docker-compose.yml's one-shot `minio-init` (MinIO's `mc` image): the buckets MLflow (artifacts),
# DVC (data remote) and the payload log write to (the last with an expiry rule), and two accounts that are not the root:
#   - the apps' account (secret s3_credentials): read-write on the buckets; the worker and MLflow;
#   - the serving account (secret s3_serving_credentials): write into `payloads` and nothing else;
#     the serving replicas read models through MLflow's artifact proxy, not from S3.
# Credentials reach `mc` through MC_HOST_fluxo and a pipe, never its arguments. Idempotent.
set -eu
for secret in minio_root_password s3_credentials s3_serving_credentials; do
    test -s "/run/secrets/$secret" || {
        echo "error: secret $secret is missing or empty; run deploy/make-secrets.sh" >&2
        exit 1
    }
done
key_id() { sed -n 's/^aws_access_key_id *= *//p' "$1"; }
key() { sed -n 's/^aws_secret_access_key *= *//p' "$1"; }
MC_HOST_fluxo="http://${MINIO_ROOT_USER}:$(cat /run/secrets/minio_root_password)@minio:9000"
export MC_HOST_fluxo
for bucket in mlflow dvc payloads; do
    mc mb --ignore-existing "fluxo/$bucket"
done
# Payload files expire in the bucket after PAYLOAD_EXPIRE_DAYS (docker-compose.yml): the replicas only add
# to it and nothing else deletes, so without a rule it grows forever. `ilm rule import` replaces the
# bucket's rules, so a second run leaves one rule, not two.
days="${PAYLOAD_EXPIRE_DAYS:-}"
case "$days" in
    '' | *[!0-9]* | 0) echo "error: PAYLOAD_EXPIRE_DAYS=$days: give a whole number of days, at least 1" >&2; exit 1 ;;
esac
printf '{"Rules": [{"ID": "expire-payloads", "Status": "Enabled", "Filter": {"Prefix": ""}, "Expiration": {"Days": %s}}]}\n' \
    "$days" | mc ilm rule import fluxo/payloads
policy="$(mktemp)"
cat > "$policy" <<'JSON'
{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucketMultipartUploads"],
   "Resource": ["arn:aws:s3:::payloads"]},
  {"Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
   "Resource": ["arn:aws:s3:::payloads/*"]}]}
JSON
mc admin policy create fluxo payloads-write-only "$policy"
rm -f "$policy"
for pair in "s3_credentials readwrite" "s3_serving_credentials payloads-write-only"; do
    file="/run/secrets/${pair% *}" grant="${pair#* }"
    user="$(key_id "$file")"
    test -n "$user" && test -n "$(key "$file")" || {
        echo "error: secret ${pair% *} has no aws_access_key_id or aws_secret_access_key; run deploy/make-secrets.sh" >&2
        exit 1
    }
    printf '%s\n%s\n' "$user" "$(key "$file")" | mc admin user add fluxo
    mc admin policy attach fluxo "$grant" --user "$user" || mc admin user info fluxo "$user" | grep -q "$grant"
done
