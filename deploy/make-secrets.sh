#!/bin/sh
# The compose stack's secrets: one random value per file, in deploy/secrets/ (git- and docker-ignored).
#
#   deploy/make-secrets.sh                  make the files that are missing; keep the others
#   deploy/make-secrets.sh --rotate NAME    a new value for NAME; the old one stays in NAME.previous
#                                           (then follow "Rotating a secret" in deploy/README.md)
#
# The folder is FLUXO_SECRETS_DIR when set, else deploy/secrets next to this script. It is made
# private to you (0700); the files in it are 0644 because the containers read them as their own
# users (postgres, mlflow, fluxo: not you), and compose mounts a secret file as it is on the host.
# Values are hex: safe in URLs, INI files and shell words alike. Needs openssl, or /dev/urandom;
# the balancer's TLS certificate (tls_certificate: a self-signed certificate and its key, PEM, for
# the names in FLUXO_TLS_NAMES) needs openssl. Your own certificate goes in that file instead.
set -eu

dir="${FLUXO_SECRETS_DIR:-$(dirname "$0")/secrets}"
NAMES="postgres_password postgres_mlflow_password postgres_prefect_password minio_root_password s3_credentials
s3_serving_credentials mlflow_admin_password mlflow_flask_secret_key mlflow_worker_password mlflow_serving_password
prefect_auth_string fluxo_api_key tls_certificate"

# The names the self-signed certificate is good for: add the host's name or address users reach.
TLS_NAMES="${FLUXO_TLS_NAMES:-DNS:localhost,IP:127.0.0.1}"

self_signed_certificate() {  # a certificate for $TLS_NAMES and its key, PEM, one file (HAProxy's crt)
    if ! command -v openssl >/dev/null 2>&1; then
        echo "$0: tls_certificate needs openssl (Debian: apt-get install openssl), or put your own" \
             "certificate and key, PEM, in $dir/tls_certificate" >&2
        exit 1
    fi
    work="$(mktemp -d)"
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 825 -subj "/CN=fluxo" \
        -addext "subjectAltName=$TLS_NAMES" -keyout "$work/key" -out "$work/certificate" 2>"$work/said" \
        || { cat "$work/said" >&2; rm -rf "$work"; exit 1; }
    cat "$work/certificate" "$work/key"
    rm -rf "$work"
}

random_hex() {  # $1 bytes of randomness, as 2*$1 hex digits
    if command -v openssl >/dev/null 2>&1; then
        openssl rand -hex "$1"
    else
        od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
        echo
    fi
}

value_of() {  # the content of the secret file $1
    case "$1" in
        s3_credentials)
            # The apps' MinIO account, as an AWS credentials file (AWS_SHARED_CREDENTIALS_FILE);
            # minio-init creates the account from it.
            printf '[default]\naws_access_key_id = fluxo-app\naws_secret_access_key = %s\n' "$(random_hex 24)" ;;
        s3_serving_credentials)
            # The serving replicas' account: write into the payloads bucket, nothing else (minio-init).
            printf '[default]\naws_access_key_id = fluxo-serving\naws_secret_access_key = %s\n' "$(random_hex 24)" ;;
        prefect_auth_string)
            # Prefect compares the whole string; "user:password" is the form its UI login expects.
            printf 'fluxo:%s\n' "$(random_hex 24)" ;;
        tls_certificate)
            self_signed_certificate ;;
        mlflow_flask_secret_key | fluxo_api_key)
            random_hex 32 ;;
        *)
            random_hex 24 ;;
    esac
}

write() {  # write a fresh value of $1, staged and renamed into place
    umask 077
    value_of "$1" > "$dir/.$1.tmp"
    chmod 0644 "$dir/.$1.tmp"
    mv "$dir/.$1.tmp" "$dir/$1"
}

known() {
    for name in $NAMES; do [ "$name" = "$1" ] && return 0; done
    return 1
}

mkdir -p "$dir"
chmod 0700 "$dir"

if [ "${1:-}" = "--rotate" ]; then
    name="${2:-}"
    if ! known "$name"; then
        echo "usage: $0 --rotate NAME, NAME one of:" $NAMES >&2
        exit 2
    fi
    if [ -s "$dir/$name" ]; then
        cp -p "$dir/$name" "$dir/$name.previous"
        chmod 0600 "$dir/$name.previous"
    fi
    write "$name"
    echo "rotated $dir/$name (the old value is in $name.previous); now see deploy/README.md, \"Rotating a secret\""
    exit 0
fi
if [ $# -gt 0 ]; then
    echo "usage: $0 [--rotate NAME]" >&2
    exit 2
fi

for name in $NAMES; do
    if [ -s "$dir/$name" ]; then
        echo "kept    $dir/$name"
    else
        write "$name"
        echo "made    $dir/$name"
    fi
done
