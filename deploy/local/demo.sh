#!/usr/bin/env bash
# A local 3-node weft mesh in network namespaces, with the embedded dir registry:
#   sudo deploy/local/demo.sh            (builds meshd, runs the demo, cleans up)
#   sudo deploy/local/demo.sh --keep     (leave it running; `deploy/local/demo.sh --down` removes it)
# Underlay: a "switch" namespace with a bridge that also routes (198.18.0.0/24). Node i runs
# meshd with pod CIDR 10.42.i.0/24 and one pod (10.42.i.10) behind a veth pair. The demo pings
# pod to pod across nodes, captures the underlay to show that only WireGuard UDP crosses it
# (and never the payload marker), and prints `meshd status`.
set -euo pipefail
cd "$(dirname "$0")/../.."
P=weftdemo
N=3
RUN=/tmp/$P

down() {
    pkill -f "meshd run --node-name $P-" 2>/dev/null || true
    sleep 0.3
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do ip netns del "$ns"; done
    rm -rf "$RUN"
}
if [ "${1:-}" = "--down" ]; then down; echo "demo removed"; exit 0; fi
[ "$(id -u)" -eq 0 ] || { echo "run as root (network namespaces)"; exit 1; }
# What the demo needs on a fresh Debian machine (protoc: building meshd builds the etcd-client
# crate). Installed from Debian's packages when missing.
need=()
for pair in ip:iproute2 tcpdump:tcpdump ping:iputils-ping protoc:protobuf-compiler od:coreutils; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
        || { echo "could not install ${need[*]}"; exit 1; }
fi

echo "== building meshd"
cargo build -q -p weft-meshd
MESHD=$PWD/target/debug/meshd
down
mkdir -p "$RUN"
[ "${1:-}" = "--keep" ] || trap down EXIT

echo "== underlay: switch namespace $P-sw with bridge br0, routing 198.18.0.0/24"
ip netns add $P-sw
ip -n $P-sw link add br0 type bridge
ip -n $P-sw link set br0 up
ip -n $P-sw addr add 198.18.0.1/24 dev br0
ip netns exec $P-sw sysctl -qw net.ipv4.ip_forward=1

for i in $(seq 1 $N); do
    ns=$P-n$i
    ip netns add $ns
    ip link add u$i netns $P-sw type veth peer name eth0 netns $ns
    ip -n $P-sw link set u$i master br0 up
    ip -n $ns link set lo up
    ip -n $ns link set eth0 up
    ip -n $ns addr add 198.18.0.1$i/24 dev eth0
    ip -n $ns route add default via 198.18.0.1
    ip netns exec $ns "$MESHD" run --node-name $P-n$i --registry dir:$RUN/registry \
        --endpoint 198.18.0.1$i --pod-cidr 10.42.$i.0/24 --state-dir $RUN/n$i \
        --api-socket $RUN/n$i.sock --wg-uapi-dir $RUN/wg$i >"$RUN/n$i.log" 2>&1 &
    # one pod: its own namespace behind a veth pair, default route via a link-local gateway
    pod=$P-pod$i
    ip netns add $pod
    ip link add veth$i netns $ns type veth peer name eth0 netns $pod
    ip -n $pod link set lo up
    ip -n $pod link set eth0 up mtu 1420
    ip -n $pod addr add 10.42.$i.10/32 dev eth0
    ip -n $pod route add 169.254.1.1 dev eth0 scope link
    ip -n $pod route add default via 169.254.1.1 dev eth0
    ip -n $ns link set veth$i up
    ip netns exec $ns sysctl -qw net.ipv4.conf.veth$i.proxy_arp=1
    ip -n $ns route add 10.42.$i.10/32 dev veth$i
done

echo "== waiting for the mesh"
for _ in $(seq 1 50); do
    ok=1
    for i in $(seq 1 $N); do
        n=$(ip netns exec $P-n$i "$MESHD" status --json --api-socket $RUN/n$i.sock 2>/dev/null \
            | grep -o '"latestHandshakeSecsAgo":[0-9]' | wc -l || true)
        [ "$n" -eq $((N - 1)) ] || ok=0
    done
    [ $ok -eq 1 ] && break
    # traffic starts handshakes too
    for i in $(seq 2 $N); do ip netns exec $P-pod1 ping -c1 -W1 10.42.$i.10 >/dev/null 2>&1 || true; done
    sleep 0.2
done

MARK=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "== capturing the underlay (bridge in $P-sw) while pods ping with payload marker $MARK"
ip netns exec $P-sw tcpdump -U -n -i br0 -w $RUN/underlay.pcap 2>$RUN/tcpdump.err &
TD=$!
# the control: the same traffic seen inside node 1's TUN, before encryption
ip netns exec $P-n1 tcpdump -U -n -i weft0 -w $RUN/tun.pcap 2>$RUN/tcpdump-tun.err &
TT=$!
for _ in $(seq 1 50); do grep -q listening $RUN/tcpdump.err 2>/dev/null && grep -q listening $RUN/tcpdump-tun.err 2>/dev/null && break; sleep 0.1; done
for i in $(seq 1 $N); do
    for j in $(seq 1 $N); do
        [ $i = $j ] && continue
        printf 'pod %s -> pod %s: ' 10.42.$i.10 10.42.$j.10
        ip netns exec $P-pod$i ping -c 3 -i 0.2 -p "$MARK" 10.42.$j.10 | grep -o '[0-9]* received'
    done
done
sleep 0.5; kill -INT $TD $TT; wait $TD $TT 2>/dev/null || true
echo
echo "== what crossed the underlay:"
tcpdump -n -r $RUN/underlay.pcap 2>/dev/null | awk '{for(i=1;i<=NF;i++) if($i=="UDP,"||$i=="ICMP"||$i=="ARP,") print $i}' | sort | uniq -c
tcpdump -n -r $RUN/underlay.pcap 2>/dev/null | head -4
has_marker() { od -An -tx1 -v "$1" | tr -d ' \n' | grep -q "$MARK"; }
has_marker $RUN/tun.pcap || { echo "!! control failed: marker not seen on weft0"; exit 1; }
echo "control: marker $MARK seen in plaintext on weft0 inside node 1"
if has_marker $RUN/underlay.pcap; then
    echo "!! marker seen in plaintext on the underlay"; exit 1
fi
echo "marker never seen on the underlay: pod traffic is encrypted"

echo
echo "== meshd status on $P-n1"
ip netns exec $P-n1 "$MESHD" status --api-socket $RUN/n1.sock
if [ "${1:-}" = "--keep" ]; then
    echo; echo "left running; logs in $RUN; remove with: deploy/local/demo.sh --down"
fi
