//! weft-tests: a network-namespace cluster harness for weft's end-to-end tests and benchmarks.
//!
//! Topology built by [`Cluster::new`]:
//! - a switch namespace `wt-<pid>-<seq>-sw` holding a bridge with 198.18.0.1/24; it is also a
//!   router (ip_forward on) and every node's default route points at it, so a plaintext packet
//!   for a pod range that leaks out of a node really crosses the bridge (and shows up in
//!   [`Cluster::capture_underlay`]);
//! - node `i` (0-based) in `wt-<pid>-<seq>-n<i>`, `eth0` = 198.18.0.(10+i)/24 on the bridge,
//!   registry name `node-<i>`, pod CIDR 10.42.(i+1).0/24, mesh address 10.42.(i+1).1;
//! - pod `k` of node `i` in `wt-<pid>-<seq>-n<i>p<k>`: `eth0` 10.42.(i+1).(10+k)/32, default via
//!   169.254.1.1 (proxy ARP on the host veth, Calico style), /32 host route in the node;
//! - pods attached by the weft-cni plugin instead (empty namespaces `wt-<pid>-<seq>-n<i>cp<k>`,
//!   see [`cni`]).
//!
//! **Sites** ([`ClusterOpts::sites`], a list of [`SiteSpec`]; empty = the flat topology above):
//! locations for the NAT-traversal, hole-punching and relay tests (see [`sites`]).
//! - a public site (`nat: None`) keeps its nodes on the bridge; only the location differs;
//! - a NAT site `s` gets a router `wt-<pid>-<seq>-r<s>`: `wan` 198.18.0.(200+s) on the bridge,
//!   LAN bridge 192.168.(s+1).1/24; its node `i` is 192.168.(s+1).(10+i) (that is its
//!   `underlay_ip`), masqueraded to the WAN address, unsolicited inbound dropped;
//!   [`NatKind::PortPreserving`] keeps the source port, [`NatKind::Symmetric`] maps every
//!   destination to another random port; `udp_timeout_secs` sets the router's UDP conntrack
//!   timeouts;
//! - [`Cluster::block_udp_between_sites`] drops UDP between two sites on the switch (ICMP passes),
//!   [`Cluster::nat_mappings`] lists a router's conntrack entries, [`Node::udp_socket`] opens a
//!   plain UDP socket in a node; `tests/nat_selftest.rs` proves each property.
//!
//! All nodes share one `dir:` registry in the cluster's temp dir, or an etcd started by
//! [`Cluster::start_etcd`] (or, with TLS, client certificates and per-node users,
//! [`Cluster::start_etcd_secure`]) in the switch namespace (see [`etcd`]). meshd is run as
//! `ip netns exec NODE meshd run ...` (see [`Node::start_meshd`]). Everything is torn down when
//! the [`Cluster`] drops (also on panic); leftovers of crashed runs are removed when the next
//! cluster is created. Clusters are serialized by a machine-wide lock ([`util::HarnessLock`]).
//!
//! Run the root tests serially:
//! `cargo build --workspace --bins && cargo test -p weft-tests -- --test-threads=1`
//!
//! # Design (the overview is in ARCHITECTURE.md)
//!
//! **weft-tests** (`tests/harness`) is the netns cluster harness. A switch namespace with a bridge
//! that also routes, N node namespaces running meshd, pods as namespaces behind veth pairs, traffic
//! and capture helpers, and wireguard-go peers. `Cluster::start_etcd` runs a real etcd in the switch namespace
//! (198.18.0.1:2379, data in the cluster's temp dir) for the etcd end-to-end tests.
//! `Cluster::start_kube` (`src/kube.rs`) runs a real control plane there, as envtest does: its own
//! etcd on the switch's loopback, kube-apiserver v1.37.2 on https://198.18.0.1:6443 (Node,RBAC
//! authorization, NodeRestriction, service-account signing key, a PKI made with openssl, an admin
//! client certificate in `system:masters`) and optionally kube-controller-manager with only its
//! garbage collector; binaries from `scripts/kube-bins.sh`. It makes Node objects, ServiceAccount
//! tokens bound to a Pod on a node (TokenRequest, as the kubelet does for a DaemonSet pod; they
//! carry the node name the admission policy checks) and kubeconfigs for them. `RealCluster`
//! (`src/kubelet.rs`) goes further: kube-controller-manager (node IPAM, DaemonSet, Deployment) and
//! kube-scheduler, and per netns node a containerd and a kubelet v1.37.2 in a mount namespace of
//! its own (per-node CNI, weft, kubelet and containerd dirs bind-mounted over the real paths), so
//! weft is deployed by its own DaemonSet from an image built here, and containerd calls weft-cni
//! for every pod. It also holds the end-to-end tests and the
//! benchmarks: `weft-bench` (data path), `weft-cni-bench` (pod attach) and `weft-registry-bench` (1000
//! node records through the kube and etcd registries into one meshd, side by side). **tests/vclock** is a separate workspace with virtual-clock tests of
//! weft-core (boringtun's `mock-instant`), kept apart so that feature never reaches a binary.

pub mod capture;
pub mod cluster;
pub mod cni;
pub mod etcd;
pub mod kube;
pub mod kube_mesh;
pub mod kubelet;
pub mod netpol;
pub mod perf;
pub mod sites;
pub mod traffic;
pub mod util;

pub use capture::{parse_pcap, Capture, Marker, Packet, Packets};
pub use cluster::{
    counter_of, drops_of, harness_namespaces, peer_of, wg_genkey, wg_pubkey, wg_quick_values,
    Cluster, ClusterOpts, Node, Pod, RecordSpec, Registry, WgImpl, WgKeys, WgPeer, CLUSTER_CIDR,
    LOW_ORDER_KEY, MESH_PORT,
};
pub use cni::{
    cnitool_bin, cnitool_container_id, expected_host_veth, netns_path, ns_snapshot, result_host_if,
    result_ipv4, weft_cni_best_bin, weft_cni_bin, weft_cni_failpoints_bin, CniCall, CniOutput,
    CniPod, NetSnapshot, OutsideHost, CNI_NET, CNI_VERSIONS, FAILPOINTS, REF_PLUGINS,
};
pub use etcd::{
    node_user, rbac_script, Etcd, EtcdAuthOpts, EtcdLogin, MeshdEtcdArgs, ADMIN_USER,
    ETCD_CLIENT_PORT, ETCD_PEER_PORT, NO_USER_CN,
};
pub use sites::{udp_socket_in, NatKind, SiteSpec};
pub use traffic::{
    assert_tcp_intact, ping, sh_in, tcp_transfer, udp_send, BgPing, PingOpts, PingResult, TcpOpts,
    TcpResult, UdpReceived, UdpReceiver, UdpSend,
};
pub use util::{keyctl_in, set_bin_dir, set_nettool, wait_for, wait_until, workspace_bin};
