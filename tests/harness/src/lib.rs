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
//! All nodes share one `dir:` registry in the cluster's temp dir, or an etcd started by
//! [`Cluster::start_etcd`] (or, with TLS, client certificates and per-node users,
//! [`Cluster::start_etcd_secure`]) in the switch namespace (see [`etcd`]). meshd is run as
//! `ip netns exec NODE meshd run ...` (see [`Node::start_meshd`]). Everything is torn down when
//! the [`Cluster`] drops (also on panic); leftovers of crashed runs are removed when the next
//! cluster is created. Clusters are serialized by a machine-wide lock ([`util::HarnessLock`]).
//!
//! Run the root tests serially:
//! `cargo build --workspace --bins && cargo test -p weft-tests -- --test-threads=1`

pub mod capture;
pub mod cluster;
pub mod cni;
pub mod etcd;
pub mod kube;
pub mod kube_mesh;
pub mod kubelet;
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
pub use traffic::{
    assert_tcp_intact, ping, sh_in, tcp_transfer, udp_send, BgPing, PingOpts, PingResult, TcpOpts,
    TcpResult, UdpReceived, UdpReceiver, UdpSend,
};
pub use util::{keyctl_in, set_bin_dir, set_nettool, wait_for, wait_until, workspace_bin};
