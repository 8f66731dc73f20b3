#!/usr/bin/env bash
# Installs, when missing, the Debian packages the build needs: a C toolchain
# and make (librdkafka is compiled from source by the rdkafka crate),
# pkg-config and OpenSSL's headers (librdkafka's TLS and SASL/SCRAM for
# Kafka). Called by scripts/test.sh and scripts/demo.sh; needs root only
# when something is missing.
#
#   scripts/build-deps.sh
set -euo pipefail
log() { echo "[build-deps.sh] $*" >&2; }
missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ! pkg-config --exists openssl 2>/dev/null; then missing+=(libssl-dev); fi
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  log "missing build packages: ${missing[*]}; run as root: apt-get install ${missing[*]}"
  exit 1
fi
log "installing ${missing[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq "${missing[@]}" >&2
