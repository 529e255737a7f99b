#!/usr/bin/env bash
# Installs Petrel's build and test dependencies from Debian. Idempotent; run as root (or with sudo).
set -euo pipefail
pkgs=(build-essential cmake pkg-config python3
      libcaf-dev libucx-dev ucx-utils libyaml-cpp-dev libboost-dev doctest-dev
      nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev libopenblas-dev
      curl procps iproute2 fortunes)
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
