"""Make the stack's buckets on the S3 stand-in (deploy/compose.local.yml's ``minio-init``).

MinIO's ``minio-init`` (docker-compose.yml) also makes the apps' accounts and their policies with
``mc admin``; the stand-in has no accounts to make (it checks no credentials), so this makes the
buckets only (and the payloads bucket's expiry rule), with the apps' key from the ``s3_credentials``
secret. Idempotent.
"""

from __future__ import annotations

import os
import sys

BUCKETS = ("mlflow", "dvc", "payloads")


def main() -> int:
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("S3_ENDPOINT", "http://minio:9000")
    credentials = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "/run/secrets/s3_credentials")
    if not os.path.getsize(credentials):
        print(f"error: secret {credentials} is empty; run deploy/make-secrets.sh", file=sys.stderr)
        return 1
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 10, "mode": "standard"}))
    existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    for bucket in BUCKETS:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
        print(f"bucket {bucket}: {'kept' if bucket in existing else 'made'}")
    days = os.environ.get("PAYLOAD_EXPIRE_DAYS", "")
    if not days.isdigit() or int(days) < 1:
        print(f"error: PAYLOAD_EXPIRE_DAYS={days}: give a whole number of days, at least 1", file=sys.stderr)
        return 1
    # As deploy/minio-init.sh: payload files expire; putting the configuration replaces the bucket's rules.
    client.put_bucket_lifecycle_configuration(Bucket="payloads", LifecycleConfiguration={"Rules": [
        {"ID": "expire-payloads", "Status": "Enabled", "Filter": {"Prefix": ""}, "Expiration": {"Days": int(days)}}]})
    print(f"bucket payloads: objects expire after {days} days")
    return 0


if __name__ == "__main__":
    sys.exit(main())
