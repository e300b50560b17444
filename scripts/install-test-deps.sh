#!/usr/bin/env bash
# Installs what weft's netns test harness (tests/harness) and weft-bench need.
# Idempotent, non-interactive, run as root:  sudo scripts/install-test-deps.sh
#   - Debian packages: wireguard-go wireguard-tools iperf3 tcpdump iputils-ping iproute2 procps
#     psmisc nftables (apt-get update + install only when one of them is missing)
#   - boringtun-cli 0.7.1 via `cargo install` (only when not already on PATH / in ~/.cargo/bin)
set -euo pipefail

die() { echo "install-test-deps: ERROR: $*" >&2; exit 1; }
log() { echo "install-test-deps: $*" >&2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (the harness needs netns, veth and /dev/net/tun anyway)"

export DEBIAN_FRONTEND=noninteractive
PKGS=(wireguard-go wireguard-tools iperf3 tcpdump iputils-ping iproute2 procps psmisc nftables)

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

for b in wireguard-go wg iperf3 tcpdump ping ip tc; do
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

[ -c /dev/net/tun ] || log "WARNING: /dev/net/tun is missing; TUN-based tests and benchmarks will fail"
log "all test dependencies present"
