#!/usr/bin/env bash
# The one command that installs what the tests need and runs them all (as root):
#   sudo scripts/test.sh
# Steps: test dependencies (apt + boringtun-cli), the Kubernetes binaries (built once, cached),
# the shell-script lint, fmt, clippy, the sans-IO dependency rule, unit tests (they include the check that
# deploy/crds is what the Rust types generate), a short fuzz run, virtual-clock tests, then the
# netns end-to-end tests (serial, one thread; they include the real kube-apiserver tier and the
# real-node tier: kubelet + containerd per node, weft deployed by its DaemonSet, and the
# multi-site NAT topology self-test, tests/harness/tests/nat_selftest.rs; and the NetworkPolicy
# tier, tests/harness/tests/netpol.rs: upstream's netpol model and the cases of
# tests/netpol/cases.json on a 3-node mesh on the real API server), and
# the data-path ones of those again with offloads off and one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
export CARGO_TERM_COLOR=never
start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }

step "install test dependencies"
scripts/install-test-deps.sh

step "Kubernetes v1.37.2 binaries (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet; cached)"
# Built once from the Go module proxy into /var/cache/weft/kubernetes/VERSION (~25 min cold on
# 2 cores, nothing when cached); the kube test tier and the real-node tier (kubelet.rs) run them.
WEFT_KUBE_BIN=$(scripts/kube-bins.sh)
export WEFT_KUBE_BIN
"$WEFT_KUBE_BIN/kube-apiserver" --version
"$WEFT_KUBE_BIN/kubectl" version --client
"$WEFT_KUBE_BIN/kubelet" --version

step "shellcheck"
shellcheck scripts/*.sh deploy/image/*.sh deploy/etcd/*.sh tests/e2e/*.sh

step "the kustomize base builds (kubectl kustomize deploy/)"
"$WEFT_KUBE_BIN/kubectl" kustomize deploy/ >/dev/null

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "weft-core stays sans-IO"
tree=$(cargo tree -p weft-core -e normal --prefix none)
bad=$(echo "$tree" | grep -E '^(tokio|mio|socket2|netlink-[a-z-]+|rtnetlink|async-io|async-std|smol|tun|tun-tap) ' || true)
if [ -n "$bad" ]; then
    echo "weft-core must not depend on tokio, sockets or netlink; cargo tree shows:"; echo "$bad"; exit 1
fi
# nix arrives only through boringtun's clock (features time/user); its socket/net parts must not.
if cargo tree -p weft-core -e features -i nix 2>/dev/null | grep -qE 'nix feature "(socket|net|ioctl)"'; then
    echo "weft-core pulls in nix with socket/net features"; exit 1
fi
echo "ok: no tokio, socket or netlink crate under weft-core"

step "build binaries"
cargo build --workspace --bins

step "build the failpoint-enabled weft-cni (target/failpoints, for the CNI failure tests)"
cargo build -p weft-cni --features failpoints --target-dir target/failpoints

step "unit and integration tests (no namespaces)"
cargo test --workspace --exclude weft-tests

step "fuzz the offload parsing code, the WireGuard UAPI parser and the path messages (fuzz/: cargo-fuzz, nightly), 30 s per target"
scripts/fuzz.sh 30

step "virtual-clock tests (separate workspace: boringtun mock-instant)"
CARGO_TARGET_DIR="$PWD/target" cargo test --manifest-path tests/vclock/Cargo.toml

step "netns end-to-end tests (serial; meshd with its default --offload on)"
# Every test binary of weft-tests, nat_selftest (NAT routers, hole punching, UDP blocks between
# sites; plain UDP, no meshd) included; it is not in the data-path rerun below, and neither are
# netpol (NetworkPolicy: the upstream truth tables, TCP, UDP and raw-socket SCTP probes by
# weft-netpol-agent) and nft_policy (the policy table against the kernel): policy is enforced by
# the kernel's forward hook, whatever meshd's data path does.
cargo test -p weft-tests -- --test-threads=1

# The data-path tests again on the plain path (one packet per system call, no virtio_net_hdr)
# and with one data-path worker (the first run uses --workers auto, one per CPU): meshd reads
# WEFT_OFFLOAD and WEFT_WORKERS from the environment the harness passes on. The control-plane
# files (rotation, etcd*) do not depend on the data path and are not repeated, to keep CI short.
step "netns data-path tests again with WEFT_OFFLOAD=off WEFT_WORKERS=1 (serial)"
WEFT_OFFLOAD=off WEFT_WORKERS=1 cargo test -p weft-tests --test mesh --test cni --test external \
    --test revoke -- --test-threads=1

step "all tests passed in $(( $(date +%s) - start ))s"
