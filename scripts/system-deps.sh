#!/usr/bin/env bash
# Installs the system packages the test suite starts (Redis, Chromium) and the C compiler that
# builds the CPU attention kernel, when they are missing.
# PostgreSQL 15 binaries are expected from Debian's postgresql-15 package.
set -euo pipefail
need=()
command -v cc >/dev/null 2>&1 || need+=(gcc)  # layers/csrc: the CPU decode-attention kernel
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
[ -x /usr/bin/chromium ] || need+=(chromium)  # the console's browser tests (Playwright)
fc-list :lang=zh 2>/dev/null | grep -q . || need+=(fonts-wqy-zenhei)  # Chinese in screenshots
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${need[*]} (run as root or install them)" >&2
    exit 0
  fi
  echo "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
