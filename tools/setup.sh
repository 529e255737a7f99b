#!/usr/bin/env bash
# Installs Petrel's build and test dependencies from Debian. Idempotent; run as root (or with sudo).
set -euo pipefail
pkgs=(build-essential cmake pkg-config python3
      libcaf-dev libssl-dev libucx-dev ucx-utils libyaml-cpp-dev libboost-dev doctest-dev
      nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev libopenblas-dev
      curl procps iproute2 fortunes nodejs clang-14 libclang-rt-14-dev chromium chromium-driver)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The official openai npm client for tests/integration/test_openai_npm.cpp. NodeSource's nodejs ships npm;
# Debian's does not, so install Debian's npm only when there is none.
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "setup: installing npm"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends npm
fi
openai_client="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/integration/openai_client"
if [ ! -f "$openai_client/node_modules/openai/package.json" ]; then
  echo "setup: npm install in $openai_client"
  (cd "$openai_client" && npm install --no-audit --no-fund)
fi
# playwright-core drives Debian's /usr/bin/chromium in tests/integration/test_dashboard.sh (no browser download).
dashboard_browser="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/integration/dashboard_browser"
if [ ! -f "$dashboard_browser/node_modules/playwright-core/package.json" ]; then
  echo "setup: npm install in $dashboard_browser"
  (cd "$dashboard_browser" && npm install --no-audit --no-fund)
fi
