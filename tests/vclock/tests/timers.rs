//! weft-core's `Node` under a virtual clock: boringtun's `Tunn` reads `mock_instant`, and the
//! `now` passed to the node moves in step with it.

use mock_instant::MockClock;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use weft_core::node::{Node, Output};
use weft_core::peer::{DropReason, PeerConfig, PeerKind};
use weft_core::PrivateKey;

fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    weft_core::packet::ipv4_packet(src, dst, 17, payload)
}

struct Sim {
    now: Instant,
    nodes: Vec<(SocketAddr, Node)>,
    cfgs: Vec<PeerConfig>,
    delivered: Vec<Vec<Vec<u8>>>,
    /// Every datagram sent: (from node, to address, message type).
    sent: Vec<(usize, SocketAddr, u8, usize)>,
    /// Addresses that swallow datagrams (a dead endpoint or a partition).
    blackholes: Vec<SocketAddr>,
    /// Addresses to which handshake initiations (only) are lost.
    drop_initiations_to: Vec<SocketAddr>,
}

impl Sim {
    fn new(n: u8, keepalive: Option<u16>) -> Sim {
        // Start the virtual clock well away from zero so durations never underflow.
        MockClock::set_time(Duration::from_secs(1000));
        let mut nodes = Vec::new();
        let mut cfgs = Vec::new();
        for i in 1..=n {
            let k = PrivateKey::generate();
            let addr: SocketAddr = format!("198.18.0.{}:51820", 10 + i).parse().expect("addr");
            cfgs.push(PeerConfig {
                name: format!("n{i}"),
                kind: PeerKind::Node,
                public_key: k.public_key(),
                next_public_key: None,
                endpoints: vec![addr],
                private_endpoints: Vec::new(),
                location: None,
                through_nat: false,
                relay: false,
                allowed_ips: vec![format!("10.42.{i}.0/24").parse().expect("net")],
                key_generation: 1,
                psk: weft_core::peer::PeerPsk::Cluster(None),
            });
            nodes.push((addr, Node::new(k, keepalive)));
        }
        Sim {
            now: Instant::now(),
            delivered: vec![Vec::new(); nodes.len()],
            nodes,
            cfgs,
            sent: Vec::new(),
            blackholes: Vec::new(),
            drop_initiations_to: Vec::new(),
        }
    }

    fn mesh(&mut self) {
        for i in 0..self.nodes.len() {
            for j in 0..self.cfgs.len() {
                if i != j {
                    let cfg = self.cfgs[j].clone();
                    self.nodes[i].1.add_peer(cfg).expect("add");
                }
            }
        }
    }

    fn pump(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some(o) = self.nodes[i].1.poll_output() {
                    moved = true;
                    match o {
                        Output::Deliver(p) => self.delivered[i].push(p),
                        Output::Transmit { dst, payload } => {
                            self.sent.push((i, dst, payload[0], payload.len()));
                            if self.blackholes.contains(&dst)
                                || (payload[0] == 1 && self.drop_initiations_to.contains(&dst))
                            {
                                continue;
                            }
                            let from = self.nodes[i].0;
                            let now = self.now;
                            if let Some(j) = self.nodes.iter().position(|(a, _)| *a == dst) {
                                self.nodes[j].1.handle_udp(from, &payload, now);
                            }
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("datagrams kept flowing: a loop");
    }

    /// Advances both clocks in 250 ms ticks, running timers and moving datagrams.
    fn advance(&mut self, d: Duration) {
        let tick = Duration::from_millis(250);
        let mut left = d;
        while !left.is_zero() {
            let step = left.min(tick);
            MockClock::advance(step);
            self.now += step;
            left -= step;
            for i in 0..self.nodes.len() {
                let now = self.now;
                self.nodes[i].1.handle_timeout(now);
            }
            self.pump();
        }
    }

    fn send(&mut self, from: usize, to: usize, payload: &[u8]) -> Vec<u8> {
        let p = ipv4_packet(
            [10, 42, from as u8 + 1, 5],
            [10, 42, to as u8 + 1, 5],
            payload,
        );
        let now = self.now;
        self.nodes[from].1.handle_tun(&p, now);
        self.pump();
        p
    }

    fn initiations_to(&self, dst: SocketAddr) -> usize {
        self.sent
            .iter()
            .filter(|(_, d, t, _)| *d == dst && *t == 1)
            .count()
    }
}

#[test]
fn lost_initiation_is_retried_after_rekey_timeout() {
    let mut sim = Sim::new(2, None);
    let b = sim.nodes[1].0;
    sim.blackholes.push(b);
    let cfg = sim.cfgs[1].clone();
    sim.nodes[0].1.add_peer(cfg).expect("add");
    sim.pump();
    assert_eq!(sim.initiations_to(b), 1);
    sim.blackholes.clear();
    let cfg = sim.cfgs[0].clone();
    sim.nodes[1].1.add_peer(cfg).expect("add");
    // Node 1's own initiation would complete the session; swallow the ones towards node 0 so
    // that we see node 0's retry.
    sim.blackholes.push(sim.nodes[0].0);
    sim.pump();
    sim.blackholes.clear();
    sim.advance(Duration::from_secs(4));
    assert_eq!(sim.initiations_to(b), 1, "no retry before REKEY_TIMEOUT");
    sim.advance(Duration::from_secs(2));
    assert_eq!(sim.initiations_to(b), 2, "one retry after REKEY_TIMEOUT");
    let p = sim.send(0, 1, b"after-retry");
    assert_eq!(sim.delivered[1], vec![p]);
}

#[test]
fn soak_past_reject_after_time_rekeys_and_loses_nothing() {
    let mut sim = Sim::new(2, None);
    sim.mesh();
    sim.pump();
    let mut expected = [0usize; 2];
    for second in 0..400u32 {
        for (from, to) in [(0usize, 1usize), (1, 0)] {
            sim.send(from, to, format!("s{second}").as_bytes());
            expected[to] += 1;
        }
        sim.advance(Duration::from_secs(1));
    }
    assert_eq!(
        sim.delivered[0].len(),
        expected[0],
        "lost packets towards node 0"
    );
    assert_eq!(
        sim.delivered[1].len(),
        expected[1],
        "lost packets towards node 1"
    );
    let inits = sim.sent.iter().filter(|(_, _, t, _)| *t == 1).count();
    // 400 s of traffic with REKEY_AFTER_TIME 120 s: at least three rekeys beyond the first.
    assert!(inits >= 4, "only {inits} handshakes in 400 s");
    for (_, n) in &sim.nodes {
        assert_eq!(n.drops().total(), 0, "{:?}", n.drops());
    }
}

#[test]
fn persistent_keepalive_keeps_an_idle_link_warm() {
    let mut sim = Sim::new(2, Some(25));
    sim.mesh();
    sim.pump();
    let before = sim.sent.len();
    sim.advance(Duration::from_secs(26));
    let keepalives = sim.sent[before..]
        .iter()
        .filter(|(_, _, t, len)| *t == 4 && *len == 32)
        .count();
    assert!(
        keepalives >= 2,
        "expected keepalives from both nodes, got {keepalives}"
    );

    // Without persistent keepalive an idle link stays silent.
    let mut quiet = Sim::new(2, None);
    quiet.mesh();
    quiet.pump();
    quiet.advance(Duration::from_secs(15));
    let before = quiet.sent.len();
    quiet.advance(Duration::from_secs(30));
    assert_eq!(
        quiet.sent.len(),
        before,
        "idle link sent {:?}",
        &quiet.sent[before..]
    );
}

#[test]
fn second_endpoint_used_when_first_does_not_answer() {
    let mut sim = Sim::new(2, None);
    let dead: SocketAddr = "198.18.0.250:51820".parse().expect("addr");
    sim.blackholes.push(dead);
    sim.cfgs[1].endpoints.insert(0, dead);
    let (c0, c1) = (sim.cfgs[0].clone(), sim.cfgs[1].clone());
    // Node 1's initiations towards node 0 are lost, so only node 0 can make the session (and
    // roaming cannot find node 1 for it).
    sim.drop_initiations_to.push(sim.nodes[0].0);
    sim.nodes[1].1.add_peer(c0).expect("add");
    sim.nodes[0].1.add_peer(c1).expect("add");
    let p = sim.send(0, 1, b"queued");
    assert!(sim.delivered[1].is_empty());
    assert_eq!(sim.initiations_to(dead), 1);
    sim.advance(Duration::from_secs(6));
    assert_eq!(
        sim.delivered[1],
        vec![p],
        "queued packet delivered via the second endpoint"
    );
    let st = sim.nodes[0].1.peer_status();
    assert_eq!(st[0].endpoint.as_deref(), Some("198.18.0.12:51820"));
}

#[test]
fn unreachable_peer_stops_after_rekey_attempt_time_and_queue_drops_are_counted() {
    let mut sim = Sim::new(2, None);
    let b = sim.nodes[1].0;
    sim.blackholes.push(b);
    let cfg = sim.cfgs[1].clone();
    sim.nodes[0].1.add_peer(cfg).expect("add");
    sim.send(0, 1, b"never");
    sim.advance(Duration::from_secs(20));
    assert_eq!(
        sim.nodes[0].1.drops().get(DropReason::HandshakeTimeout),
        1,
        "queued packet expired and counted"
    );
    sim.advance(Duration::from_secs(100));
    let n = sim.initiations_to(b);
    // One initiation per REKEY_TIMEOUT (5 s) for REKEY_ATTEMPT_TIME (90 s), then silence.
    assert!((15..=20).contains(&n), "{n} initiations");
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.initiations_to(b), n, "attempts continued past 90 s");
}

/// Key rotation under the virtual clock, with traffic every 100 ms both ways on all three links
/// and the rotation straddling REKEY_AFTER_TIME (120 s): node 0 adds its next key at 110 s, peers
/// learn it 300 ms later, node 0 handshakes on it, waits until every peer has moved, retires the
/// old key, and peers learn the new key 300 ms later. Then 300 s more (several rekeys on the new
/// key). Not one packet is lost, and nobody ends with more than one key pair per peer.
#[test]
fn rotation_straddling_a_rekey_loses_nothing() {
    use weft_core::node::PeerRotation;
    let mut sim = Sim::new(3, None);
    sim.mesh();
    sim.pump();
    let mut expected = [0usize; 3];
    let mut seq = 0u64;
    let mut step = |sim: &mut Sim, expected: &mut [usize; 3]| {
        for (from, to) in [(0usize, 1usize), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)] {
            seq += 1;
            sim.send(from, to, format!("p{seq}").as_bytes());
            expected[to] += 1;
        }
        sim.advance(Duration::from_millis(100));
    };
    for _ in 0..1100 {
        step(&mut sim, &mut expected);
    }
    let next = PrivateKey::generate();
    let next_pub = next.public_key();
    sim.nodes[0].1.set_next_key(next).expect("next key");
    for _ in 0..3 {
        step(&mut sim, &mut expected);
    }
    sim.cfgs[0].next_public_key = Some(next_pub);
    for j in 1..3 {
        let cfg = sim.cfgs[0].clone();
        sim.nodes[j].1.update_peer(cfg).expect("announce");
    }
    step(&mut sim, &mut expected);
    sim.nodes[0].1.initiate_next();
    let mut waited = 0;
    while !sim.nodes[0]
        .1
        .rotation_progress()
        .values()
        .all(|p| *p == PeerRotation::Moved)
    {
        step(&mut sim, &mut expected);
        waited += 1;
        assert!(waited < 100, "{:?}", sim.nodes[0].1.rotation_progress());
    }
    assert!(sim.nodes[0].1.promote_next_key());
    for _ in 0..3 {
        step(&mut sim, &mut expected);
    }
    sim.cfgs[0].public_key = next_pub;
    sim.cfgs[0].next_public_key = None;
    for j in 1..3 {
        let cfg = sim.cfgs[0].clone();
        sim.nodes[j].1.update_peer(cfg).expect("retire");
    }
    for _ in 0..3000 {
        step(&mut sim, &mut expected);
    }
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(
            sim.delivered[i].len(),
            *want,
            "lost packets towards node {i}"
        );
        assert_eq!(
            sim.nodes[i].1.drops().total(),
            0,
            "{:?}",
            sim.nodes[i].1.drops()
        );
        for p in sim.nodes[i].1.peer_status() {
            assert_eq!(p.key_pairs, 1, "node {i} peer {}", p.name);
        }
    }
    assert_eq!(sim.nodes[0].1.public_key(), next_pub);
}

/// A node behind NAT (`through_nat` on its link to a public node) sends a keepalive on that link
/// every `--nat-keepalive` seconds while idle, so the NAT mapping never times out; the public
/// node sends none, and a node-to-node link without NAT none either. After two idle minutes the
/// public node still reaches the NAT'd one first.
#[test]
fn nat_keepalive_only_on_links_through_nat() {
    let mut s = Sim::new(3, None);
    // n2 is behind NAT: n1 knows no endpoint of it; n2 reaches n1 through its NAT.
    let mut n2_seen = s.cfgs[1].clone();
    n2_seen.endpoints.clear();
    let mut n1_from_n2 = s.cfgs[0].clone();
    n1_from_n2.through_nat = true;
    s.nodes[1].1.set_nat_keepalive(Some(3));
    s.nodes[0].1.set_nat_keepalive(Some(3));
    s.nodes[0].1.add_peer(n2_seen).expect("add");
    s.nodes[1].1.add_peer(n1_from_n2).expect("add");
    // n1 and n3: plain public link.
    let (c1, c3) = (s.cfgs[0].clone(), s.cfgs[2].clone());
    s.nodes[0].1.add_peer(c3).expect("add");
    s.nodes[2].1.add_peer(c1).expect("add");
    s.pump();
    s.advance(Duration::from_secs(2));
    s.sent.clear();
    s.advance(Duration::from_secs(120));
    let (a1, a2, a3) = (s.nodes[0].0, s.nodes[1].0, s.nodes[2].0);
    let keepalives = |from: usize, to: SocketAddr| {
        s.sent
            .iter()
            .filter(|(f, d, t, len)| *f == from && *d == to && *t == 4 && *len == 32)
            .count()
    };
    let from_nat = keepalives(1, a1);
    assert!(
        (35..=41).contains(&from_nat),
        "{from_nat} keepalives from the NAT'd node in 120 s at 3 s"
    );
    assert_eq!(keepalives(0, a2), 0, "the public side sends none");
    assert_eq!(keepalives(0, a3) + keepalives(2, a1), 0, "no NAT, no keepalive");
    // The public node speaks first after the idle time: answered.
    let p = ipv4_packet([10, 42, 1, 5], [10, 42, 2, 7], b"after-idle");
    let now = s.now;
    s.nodes[0].1.handle_tun(&p, now);
    s.pump();
    assert_eq!(s.delivered[1].last(), Some(&p));
}
