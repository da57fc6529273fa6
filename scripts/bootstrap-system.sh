#!/usr/bin/env bash
# Installs the Debian packages the tests and tools need, once, when they are missing.
# Runs as root on the project's machines (CI included); elsewhere it only reports.
set -euo pipefail

# grows with the services whose tests need a real foreign tool
packages=(
    coturn  # turnutils_uclient: a standard TURN client run against teia relay
    # the Ansible tests' hosts: rootful podman containers running systemd (scripts/podman-image.sh)
    podman runc netavark aardvark-dns containernetworking-plugins catatonit debootstrap
    postgresql  # initdb/pg_ctl: the homeserver tests start a throwaway cluster
    iproute2 iptables  # the NAT lab (tests/nat): namespaces, veth pairs, masquerading routers
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bootstrap: missing Debian packages: ${missing[*]} (run as root to install)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
