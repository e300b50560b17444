#!/usr/bin/env bash
# weft's end-to-end test on k3d: the whole user journey on a real (k3s) cluster.
#
# IT CANNOT RUN ON THE DEVELOPMENT MACHINE: that has no Docker daemon, no k3d and no image
# registry. It needs a machine with a running Docker daemon that can pull rancher/k3s, busybox
# and a tcpdump image, k3d v5 and kubectl (1.30 or newer). Without them it exits 77 (skipped)
# saying what is missing.
#
#   tests/e2e/k3d.sh                    # from anywhere; builds, tests, deletes the cluster
#
# What it does:
#   1. builds the image with `docker build -f deploy/image/Dockerfile`;
#   2. creates the cluster of deploy/k3d/cluster.yaml (1 server, 2 agents, no flannel) and
#      imports the image (`k3d image import`);
#   3. applies an overlay of deploy/ (image tag, imagePullPolicy Never, the CNI dirs k3s uses)
#      with `kubectl apply --server-side -k`, waits for the DaemonSet and for 3 Ready MeshNodes;
#   4. runs a busybox pod on each agent and pings pod to pod both ways;
#   5. sends a random marker over TCP between the pods while capturing on both agents' eth0
#      and on weft0: the marker must never appear on eth0 (only WireGuard does), and must
#      appear on weft0 (so the capture could have seen it);
#   6. checks the admission policy with real pod-bound tokens (a node may write only its own
#      objects);
#   7. rotates every node's key with `keyctl rotate --all --wait --registry kube` (as a user
#      bound to the weft-admin ClusterRole, not the cluster admin) under continuous pings both
#      ways and asserts that not one ping is lost and every key generation went up;
#   8. deletes the cluster (also on failure; E2E_KEEP=1 keeps it).
#
# Environment:
#   E2E_CLUSTER        cluster name (weft-e2e)
#   E2E_IMAGE          image to build and test (localhost/weft:e2e)
#   E2E_SKIP_BUILD=1   use E2E_IMAGE as it is in the Docker daemon
#   E2E_K3S_IMAGE      k3s image instead of the one in deploy/k3d/cluster.yaml
#   E2E_BUSYBOX_IMAGE  test pod image (docker.io/library/busybox:1.36)
#   E2E_TCPDUMP_IMAGE  image with tcpdump and timeout, run in a node's network namespace when
#                      the node has no tcpdump (docker.io/nicolaka/netshoot:v0.13)
#   E2E_KEYCTL         keyctl to run (default: keyctl from E2E_IMAGE, run with docker)
#   E2E_PING_INTERVAL  seconds between pings during the rotation (0.2)
#   E2E_KEEP=1         keep the cluster and the temp dir
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

cluster=${E2E_CLUSTER:-weft-e2e}
image=${E2E_IMAGE:-localhost/weft:e2e}
busybox=${E2E_BUSYBOX_IMAGE:-docker.io/library/busybox:1.36}
tcpdump_image=${E2E_TCPDUMP_IMAGE:-docker.io/nicolaka/netshoot:v0.13}
ping_interval=${E2E_PING_INTERVAL:-0.2}

skip() {
	echo "tests/e2e/k3d.sh: SKIPPED: $*" >&2
	exit 77
}

for tool in docker k3d kubectl; do
	command -v "$tool" >/dev/null || skip "$tool not found (needs docker, k3d v5 and kubectl)"
done
docker info >/dev/null 2>&1 || skip "no Docker daemon answers (docker info failed)"
case $image in
*/*:*) ;;
*) e2e_fail "E2E_IMAGE must be NAME/REPO:TAG (got $image)" ;;
esac

tmp=$(mktemp -d)
created=0
capture_pids=()
cleanup() {
	local rc=$?
	for pid in "${capture_pids[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	if [ "${E2E_KEEP:-0}" = 1 ]; then
		e2e_log "E2E_KEEP=1: keeping cluster $cluster (KUBECONFIG=$tmp/kubeconfig) and $tmp"
	else
		if [ "$created" = 1 ]; then
			k3d cluster delete "$cluster" >/dev/null 2>&1 || e2e_log "could not delete cluster $cluster"
		fi
		rm -rf "$tmp"
	fi
	if [ "$rc" -eq 0 ]; then
		e2e_log "ALL PASSED"
	else
		e2e_log "FAILED (exit $rc)"
	fi
}
trap cleanup EXIT

# 1. The image.
if [ "${E2E_SKIP_BUILD:-0}" != 1 ]; then
	e2e_log "building $image"
	docker build -f "$repo/deploy/image/Dockerfile" -t "$image" "$repo" >&2
fi
docker image inspect "$image" >/dev/null || e2e_fail "image $image not in the Docker daemon"

# 2. The cluster.
if k3d cluster get "$cluster" >/dev/null 2>&1; then
	e2e_fail "a k3d cluster named $cluster exists already; delete it or set E2E_CLUSTER"
fi
create_args=(cluster create "$cluster" --config "$repo/deploy/k3d/cluster.yaml")
if [ -n "${E2E_K3S_IMAGE:-}" ]; then
	create_args+=(--image "$E2E_K3S_IMAGE")
fi
e2e_log "creating k3d cluster $cluster"
created=1
k3d "${create_args[@]}" >&2
k3d kubeconfig get "$cluster" >"$tmp/kubeconfig"
export KUBECONFIG=$tmp/kubeconfig
k3d image import "$image" -c "$cluster" >&2

server=k3d-$cluster-server-0
node_a=k3d-$cluster-agent-0
node_b=k3d-$cluster-agent-1

# The CNI dirs of k3s's containerd: with flannel off k3s leaves containerd's defaults, but
# read them from the rendered config in case a k3s version sets its own.
containerd_conf=$(docker exec "$node_a" sh -c 'cat /var/lib/rancher/k3s/agent/etc/containerd/config*.toml 2>/dev/null' || true)
cni_bin=$(printf '%s\n' "$containerd_conf" | sed -n 's/^[[:space:]]*bin_dirs\{0,1\}[[:space:]]*=[[:space:]]*\[\{0,1\}[[:space:]]*"\([^"]*\)".*/\1/p' | head -1)
cni_conf=$(printf '%s\n' "$containerd_conf" | sed -n 's/^[[:space:]]*conf_dir[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' | head -1)
cni_bin=${cni_bin:-/opt/cni/bin}
cni_conf=${cni_conf:-/etc/cni/net.d}
e2e_log "k3s containerd CNI dirs: bin $cni_bin, conf $cni_conf"
if ! docker exec "$node_a" sh -c 'command -v nft || ls /var/lib/rancher/k3s/data/current/bin/aux/nft' >/dev/null 2>&1; then
	e2e_log "warning: no nft on $node_a; weft-cni's masquerade (ipMasq) needs it and pod ADD will fail"
fi

# 3. weft, through an overlay of deploy/.
overlay=$tmp/overlay
e2e_write_overlay "$overlay" "$repo/deploy" "$image" "$cni_bin" "$cni_conf"
e2e_apply_overlay "$overlay" "$image"
e2e_wait_daemonset weft-system weft 300
e2e_wait_meshnodes 3 180
e2e_k wait --for=condition=Ready node --all --timeout=180s >&2 || {
	e2e_dump_diagnostics
	e2e_fail "nodes not Ready with weft as their network"
}
e2e_pass "every node Ready"

# 4. Pods on two nodes.
e2e_run_pod weft-e2e-a "$node_a" "$busybox"
e2e_run_pod weft-e2e-b "$node_b" "$busybox"
e2e_wait_pod weft-e2e-a 180
e2e_wait_pod weft-e2e-b 180
ip_a=$(e2e_pod_ip weft-e2e-a)
ip_b=$(e2e_pod_ip weft-e2e-b)
e2e_log "weft-e2e-a $ip_a on $node_a, weft-e2e-b $ip_b on $node_b"
e2e_assert_ping weft-e2e-a "$ip_b"
e2e_assert_ping weft-e2e-b "$ip_a"

# 5. Nothing between the pods crosses eth0 in plaintext.
# A capture in a node's network namespace (the k3d node container's), ending by itself.
capture_cmd() { # NODE IFACE SECONDS
	if docker exec "$1" sh -c 'command -v tcpdump && command -v timeout' >/dev/null 2>&1; then
		echo docker exec "$1" timeout -s INT "$3" tcpdump -i "$2" -U -w -
	else
		echo docker run --rm --network "container:$1" "$tcpdump_image" timeout -s INT "$3" tcpdump -i "$2" -U -w -
	fi
}
E2E_PCAP_READER=(docker run --rm -i "$tcpdump_image" tcpdump)
docker image inspect "$tcpdump_image" >/dev/null 2>&1 || docker pull "$tcpdump_image" >&2
marker=$(e2e_random_marker)
read -r -a cap_a <<<"$(capture_cmd "$node_a" eth0 25)"
read -r -a cap_b <<<"$(capture_cmd "$node_b" eth0 25)"
read -r -a cap_t <<<"$(capture_cmd "$node_a" weft0 25)"
e2e_capture_start pid_a "$tmp/eth0-a.pcap" "${cap_a[@]}"
capture_pids+=("$pid_a")
e2e_capture_start pid_b "$tmp/eth0-b.pcap" "${cap_b[@]}"
capture_pids+=("$pid_b")
e2e_capture_start pid_t "$tmp/weft0-a.pcap" "${cap_t[@]}"
capture_pids+=("$pid_t")
sleep 1
e2e_send_marker weft-e2e-a weft-e2e-b "$ip_b" "$marker"
e2e_send_marker weft-e2e-b weft-e2e-a "$ip_a" "$marker" 7778
e2e_log "waiting for the captures to end"
e2e_capture_wait "$pid_a" "$tmp/eth0-a.pcap"
e2e_capture_wait "$pid_b" "$tmp/eth0-b.pcap"
e2e_capture_wait "$pid_t" "$tmp/weft0-a.pcap"
capture_pids=()
e2e_assert_marker_present "$tmp/weft0-a.pcap" "$marker" "weft0 on $node_a (inside the tunnel)"
e2e_assert_marker_absent "$tmp/eth0-a.pcap" "$marker" "eth0 on $node_a"
e2e_assert_marker_absent "$tmp/eth0-b.pcap" "$marker" "eth0 on $node_b"
wg_packets=$(e2e_pcap_count "$tmp/eth0-a.pcap" udp port 51820)
[ "$wg_packets" -gt 0 ] || e2e_fail "no WireGuard packets (UDP 51820) on $node_a's eth0"
e2e_pass "eth0 on $node_a carried $wg_packets WireGuard packets"

# 6. Per-node write isolation, with real pod-bound tokens.
meshd_a=$(e2e_k -n weft-system get pods -l app.kubernetes.io/name=weft \
	--field-selector "spec.nodeName=$node_a" -o jsonpath='{.items[0].metadata.name}')
[ -n "$meshd_a" ] || e2e_fail "no meshd pod on $node_a"
e2e_check_admission "$meshd_a" "$node_a" "$node_b" "$tmp"

# 7. Key rotation of every node under continuous pings, as a weft-admin user.
e2e_k create serviceaccount e2e-keyctl -n "$E2E_POD_NS" >&2
e2e_k create clusterrolebinding weft-admin-e2e --clusterrole=weft-admin \
	--serviceaccount="$E2E_POD_NS:e2e-keyctl" >&2
e2e_token_kubeconfig "$(e2e_k -n "$E2E_POD_NS" create token e2e-keyctl --duration=1h)" "$tmp/kubeconfig-keyctl"
if [ -n "${E2E_KEYCTL:-}" ]; then
	keyctl_cmd=("$E2E_KEYCTL")
else
	keyctl_cmd=(docker run --rm --network host -v "$tmp:$tmp:ro" --entrypoint /usr/local/bin/keyctl "$image")
fi
e2e_meshnode_generations >"$tmp/generations-before"
e2e_ping_start weft-e2e-a "$ip_b" "$ping_interval"
e2e_ping_start weft-e2e-b "$ip_a" "$ping_interval"
sleep 3
e2e_log "rotating every node's key"
if ! "${keyctl_cmd[@]}" rotate --all --wait --timeout 300 --registry kube \
	--kubeconfig "$tmp/kubeconfig-keyctl" >&2; then
	e2e_ping_stop weft-e2e-a "$tmp/ping-a.log" || true
	e2e_dump_diagnostics
	e2e_fail "keyctl rotate --all --wait"
fi
sleep 3
e2e_ping_stop weft-e2e-a "$tmp/ping-a.log"
e2e_ping_stop weft-e2e-b "$tmp/ping-b.log"
e2e_meshnode_generations >"$tmp/generations-after"
e2e_assert_generations_increased "$tmp/generations-before" "$tmp/generations-after"
e2e_assert_no_ping_loss "$tmp/ping-a.log" 20 "ping a -> b during the rotation"
e2e_assert_no_ping_loss "$tmp/ping-b.log" 20 "ping b -> a during the rotation"
"${keyctl_cmd[@]}" status --registry kube --kubeconfig "$tmp/kubeconfig-keyctl" >&2 ||
	e2e_fail "keyctl status"
e2e_log "cluster $cluster: server $server, agents $node_a and $node_b"
