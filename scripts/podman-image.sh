#!/usr/bin/env bash
# Builds the "bare host" image the Ansible tests run on: a Debian bookworm root filesystem with
# systemd as PID 1 and Python for Ansible, made with debootstrap and imported into rootful
# podman (no container registry is reachable from these machines). Idempotent: does nothing
# when the image exists, unless --force.
#
# Containers from this image must be started with (see ansible/molecule/*/molecule.yml):
#   --runtime runc                      crun rejects these hosts' hybrid cgroup layout
#   --ulimit nofile=20000:20000 --ulimit nproc=20000:20000
#                                       podman's default limits exceed the host's hard limit
#   --systemd always, command /sbin/init
set -euo pipefail

IMAGE=${TEIA_HOST_IMAGE:-localhost/teia-bare-host:bookworm}
SUITE=bookworm
# The Debian mirror this machine's apt already uses (or DEBIAN_MIRROR): no host is named here.
apt_mirror() {
    local uri
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v -- '-security' | head -n1 || true)
    if [[ -z $uri && -r /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    printf '%s' "$uri"
}
MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
# What a freshly installed minimal server has, plus what Ansible and the roles rely on.
INCLUDE=systemd,systemd-sysv,dbus,python3,python3-venv,python3-apt,nftables,iproute2,procps,ca-certificates

if [[ ${1:-} != --force ]] && podman image exists "$IMAGE"; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "podman-image: building $IMAGE needs root (debootstrap and rootful podman)" >&2
    exit 1
fi

if [[ -z $MIRROR ]]; then
    echo "podman-image: no Debian mirror in apt's sources; set DEBIAN_MIRROR" >&2
    exit 1
fi
root=$(mktemp -d /var/tmp/teia-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "podman-image: debootstrap $SUITE into $root" >&2
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$root" "$MIRROR" >/dev/null

# A host, not an appliance: no getty on a console that does not exist, an empty machine-id that
# systemd fills at first boot (each container gets its own), no apt caches.
rm -f "$root"/etc/systemd/system/getty.target.wants/* \
      "$root"/etc/systemd/system/multi-user.target.wants/remote-fs.target
: >"$root/etc/machine-id"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb

tar -C "$root" --numeric-owner -c . |
    podman import --change 'CMD ["/sbin/init"]' --change 'STOPSIGNAL SIGRTMIN+3' - "$IMAGE" >/dev/null
echo "podman-image: $IMAGE ready" >&2
