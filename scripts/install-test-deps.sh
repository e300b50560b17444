#!/usr/bin/env bash
# Installs what weft's netns test harness (tests/harness) and weft-bench need.
# Idempotent, non-interactive, run as root:  sudo scripts/install-test-deps.sh
#   - Debian packages: wireguard-go wireguard-tools iperf3 tcpdump iputils-ping iproute2 procps
#     psmisc nftables (apt-get update + install only when one of them is missing)
#   - shellcheck (CI checks the shell scripts), curl
#   - etcd-server etcd-client (a real etcd for the etcd and kube registry tests) and protobuf-compiler
#     (protoc, needed to build the etcd-client crate); openssl (test certificates for etcd TLS)
#   - containernetworking-plugins (reference CNI plugins in /usr/lib/cni: ptp, host-local,
#     portmap, bandwidth, loopback; they speak CNI up to 1.0.0) and iptables (portmap, ptp ipMasq)
#   - the real-node tier (tests/harness/tests/kubelet.rs): containerd and runc (a container
#     runtime per node), umoci and busybox-static (the pause and workload images, made here),
#     buildah (builds the weft image from the test run's binaries), conntrack and socat (kubelet
#     and its port-forward), util-linux (nsenter, unshare)
#   - observability: prometheus (its promtool checks meshd's /metrics), graphviz (`dot` renders
#     `keyctl graph --format svg`)
#   - boringtun-cli 0.7.1 via `cargo install` (only when not already on PATH / in ~/.cargo/bin)
#   - cnitool (CNI 1.1: add/check/del/gc/status) via `go install ...cni/cnitool@CNITOOL_VERSION`
#     into /usr/local/bin (only when missing; needs Go and the Go module proxy)
set -euo pipefail

die() { echo "install-test-deps: ERROR: $*" >&2; exit 1; }
log() { echo "install-test-deps: $*" >&2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (the harness needs netns, veth and /dev/net/tun anyway)"

export DEBIAN_FRONTEND=noninteractive
PKGS=(wireguard-go wireguard-tools iperf3 tcpdump iputils-ping iproute2 procps psmisc nftables
      containernetworking-plugins iptables etcd-server etcd-client protobuf-compiler openssl
      shellcheck curl containerd runc umoci busybox-static buildah conntrack socat util-linux
      prometheus graphviz)

missing=()
for p in "${PKGS[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
    log "Debian packages already present: ${PKGS[*]}"
else
    log "installing missing Debian packages: ${missing[*]}"
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${PKGS[@]}" || die "apt-get install failed for: ${missing[*]}"
    for p in "${missing[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        [ "$status" = "install ok installed" ] || die "package $p still not installed after apt-get install"
    done
fi

for b in wireguard-go wg iperf3 tcpdump ping ip tc nft iptables etcd etcdctl protoc openssl shellcheck curl \
         containerd ctr runc umoci busybox buildah conntrack socat nsenter unshare; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found on PATH after installing packages"
done

# boringtun-cli (benchmark comparison only). cargo puts it in ~/.cargo/bin.
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
if command -v boringtun-cli >/dev/null 2>&1; then
    log "boringtun-cli already installed: $(command -v boringtun-cli) ($(boringtun-cli --version 2>/dev/null || echo '?'))"
else
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain first (needed for boringtun-cli)"
    log "installing boringtun-cli 0.7.1 with cargo (takes a few minutes)"
    cargo install boringtun-cli --version 0.7.1 --locked || die "cargo install boringtun-cli failed"
    command -v boringtun-cli >/dev/null 2>&1 || die "boringtun-cli not on PATH after cargo install"
fi

# Reference CNI plugins (Debian puts them in /usr/lib/cni, not /opt/cni/bin).
for p in ptp host-local portmap bandwidth loopback; do
    [ -x "/usr/lib/cni/$p" ] || die "/usr/lib/cni/$p missing after installing containernetworking-plugins"
done

# cnitool (the CNI project's runtime-in-a-binary; Debian does not package it). v1.3.0 has the
# CNI 1.1 commands gc and status.
CNITOOL_VERSION=v1.3.0
CNITOOL_DIR=/usr/local/bin
if [ -x "$CNITOOL_DIR/cnitool" ]; then
    log "cnitool already installed: $CNITOOL_DIR/cnitool"
else
    GO=$(command -v go || true)
    if [ -z "$GO" ] && [ -x /usr/local/go/bin/go ]; then GO=/usr/local/go/bin/go; fi
    [ -n "$GO" ] || die "go not found: install Go (or golang-go) first (needed to build cnitool)"
    log "installing cnitool $CNITOOL_VERSION with go install into $CNITOOL_DIR"
    GOBIN="$CNITOOL_DIR" GOFLAGS=-mod=mod "$GO" install "github.com/containernetworking/cni/cnitool@$CNITOOL_VERSION" \
        || die "go install cnitool@$CNITOOL_VERSION failed"
    [ -x "$CNITOOL_DIR/cnitool" ] || die "cnitool not in $CNITOOL_DIR after go install"
fi

[ -c /dev/net/tun ] || log "WARNING: /dev/net/tun is missing; TUN-based tests and benchmarks will fail"
log "all test dependencies present"
