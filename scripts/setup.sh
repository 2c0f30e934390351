#!/usr/bin/env bash
# Installs everything tfcrypt and its lab need on Debian 12, as root; safe to rerun.
# Debian packages are installed only when missing; the venv is created once and the
# project is (re)installed into it in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (the lab creates network namespaces): sudo $0" >&2
    exit 1
fi

packages=(wireguard-go wireguard-tools etcd-server etcd-client nftables iproute2
          iputils-ping tcpdump iperf3 util-linux python3-venv
          qemu-system-x86 busybox-static cpio)  # the last three: the kernel tier (scripts/test.sh --kernel)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Debian etcd package may start a system-wide etcd; the lab never uses it.
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

# Go programs tfcrypt depends on (SPIRE; a current wireguard-go for the userspace backend;
# kube-apiserver and kubectl for the lab), from the
# pinned modules in tools/: a no-op when the cache already holds this version
# (scripts/build-go.sh, docs/lab.md "Go-built tools").
bash scripts/build-go.sh
