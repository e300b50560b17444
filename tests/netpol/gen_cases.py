#!/usr/bin/env python3
"""Generate tests/netpol/cases.json from a python transcription of the upstream
Kubernetes NetworkPolicy e2e specs (test/e2e/network/netpol/network_policy.go).

Each spec below mirrors the Go code: the policies it builds (translated from
GenNetworkPolicyWithNameAndPodMatchLabel / GenNetworkPolicyWithNameAndPodSelector /
SetSpecIngressRules / SetSpecEgressRules in policies.go) and the Expect* calls it
makes on upstream's Reachability (reachability.go + truthtable.go, re-implemented
in class Reachability below).

Upstream (at the ported commit) builds each spec on a per-spec pod subset
("x/a", "x/b", "y/a" ...).  Our model always has all nine pods, so every grid is:
  * upstream's Reachability (run on upstream's own pod subset, to prove the
    Expect* calls are valid there) for every cell whose two pods are in the
    subset -- these cells are asserted to agree with an independent
    NetworkPolicy evaluator (evaluate() below);
  * the evaluator's verdict for cells involving a pod that upstream does not
    create for that spec ("extrapolated" cells, listed per case in README).
Python 3 stdlib only.  Usage: python3 gen_cases.py [out.json]
"""
import copy
import ipaddress
import json
import os
import sys

UPSTREAM = {
    "repo": "kubernetes/kubernetes",
    "commit": "008b3652959ca58af8be3fb5b6ecfe9ae7638282",
    "file": "test/e2e/network/netpol/network_policy.go",
}
NAMESPACES = ["x", "y", "z"]
PODS = ["a", "b", "c"]
PORTS = [80, 81]
ALL = ["%s/%s" % (n, p) for n in NAMESPACES for p in PODS]
PROTOS = ["TCP", "UDP", "SCTP"]
NS_LABEL_KEY = "kubernetes.io/metadata.name"  # namespaceLabelKey == v1.LabelMetadataName

CTX_TCP = "NetworkPolicy between server and client"
CTX_UDP = "NetworkPolicy between server and client using UDP"
CTX_SCTP = "NetworkPolicy between server and client using SCTP"


# --------------------------------------------------------------------------
# Reachability / TruthTable, as upstream (reachability.go, truthtable.go)
# --------------------------------------------------------------------------
class UpstreamFail(Exception):
    pass


class Reachability:
    def __init__(self, pods, default):
        self.pods = list(pods)
        self.v = {f: {t: default for t in self.pods} for f in self.pods}

    def _set(self, f, t, val):  # TruthTable.Set: Failf on unknown keys
        if f not in self.v:
            raise UpstreamFail("from-key %s not found" % f)
        if t not in self.v[f]:
            raise UpstreamFail("to-key %s not allowed" % t)
        self.v[f][t] = val

    def expect(self, f, t, val):
        self._set(f, t, val)

    def expect_all_ingress(self, to, val):  # SetAllTo
        if to not in self.pods:
            raise UpstreamFail("to-key %s not found" % to)
        for f in self.pods:
            self.v[f][to] = val

    def expect_all_egress(self, frm, val):  # SetAllFrom
        if frm not in self.v:
            raise UpstreamFail("from-key %s not found" % frm)
        for t in self.pods:
            self.v[frm][t] = val

    def expect_peer(self, frm, to, val):  # Peer{Namespace, Pod}; "" = wildcard
        def m(peer, pod):
            ns, name = pod.split("/")
            return (peer[0] in ("", ns)) and (peer[1] in ("", name))
        for f in self.pods:
            if m(frm, f):
                for t in self.pods:
                    if m(to, t):
                        self.v[f][t] = val


def P(ns="", pod=""):
    return (ns, pod)


# --------------------------------------------------------------------------
# Policy constructors (policies.go), producing the JSON Go would send
# (encoding/json + omitempty: empty slices/maps and nil pointers are omitted).
# --------------------------------------------------------------------------
def sel(match_labels=None, exprs=None):
    s = {}
    if match_labels:
        s["matchLabels"] = dict(match_labels)
    if exprs:
        s["matchExpressions"] = exprs
    return s


def expr(key, op, values):
    return {"key": key, "operator": op, "values": list(values)}


def peer(pod_selector=None, ns_selector=None, ip_block=None):
    p = {}
    if pod_selector is not None:
        p["podSelector"] = pod_selector
    if ns_selector is not None:
        p["namespaceSelector"] = ns_selector
    if ip_block is not None:
        p["ipBlock"] = ip_block
    return p


def np_port(port=None, protocol=None):
    d = {}
    if protocol is not None:
        d["protocol"] = protocol
    if port is not None:
        d["port"] = port
    return d


def rule(peers=None, ports=None, direction="from"):
    r = {}
    if ports:
        r["ports"] = ports
    if peers:
        r[direction] = peers
    return r


def gen_policy(name, pod_selector, ingress=None, egress=None):
    """GenNetworkPolicyWithName...(name, selector, SetSpecIngressRules(ingress...),
    SetSpecEgressRules(egress...)): ingress/egress None = setter not called,
    a list (maybe empty) = setter called with those rules.  PolicyTypes are
    appended in setter call order (ingress first when both are used here, as
    in every upstream call site)."""
    spec = {"podSelector": pod_selector}
    types = []
    if ingress is not None:
        types.append("Ingress")
        if ingress:
            spec["ingress"] = ingress
    if egress is not None:
        types.append("Egress")
        if egress:
            spec["egress"] = egress
    spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


def in_ns(policy, ns):  # CreatePolicy/UpdatePolicy set the namespace
    p = copy.deepcopy(policy)
    p["metadata"]["namespace"] = ns
    return p


def ingress_from(*peers):
    return rule(list(peers), None, "from")


def egress_to(*peers):
    return rule(list(peers), None, "to")


# --------------------------------------------------------------------------
# Independent NetworkPolicy evaluator (cross-check + extrapolation)
# --------------------------------------------------------------------------
FAKE_IP = {p: "10.%d.%d.%d" % (i // 3 + 1, i % 3 + 1, 10 + i) for i, p in enumerate(ALL)}


def subst(s):
    """Resolve the {{ip NS/POD}} / {{cidr NS/POD LEN}} templates with FAKE_IP."""
    if not isinstance(s, str) or not s.startswith("{{"):
        return s
    parts = s.strip("{}").split()
    if parts[0] == "ip":
        return FAKE_IP[parts[1]]
    if parts[0] == "cidr":
        return str(ipaddress.ip_network("%s/%s" % (FAKE_IP[parts[1]], parts[2]), strict=False))
    raise ValueError(s)


def match_sel(selector, labels):
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and not (k in labels and labels[k] in vals):
            return False
        if op == "NotIn" and (k in labels and labels[k] in vals):
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


class State:
    def __init__(self):
        self.pod_labels = {p: {"pod": p.split("/")[1]} for p in ALL}
        self.ns_labels = {n: {"ns": n} for n in NAMESPACES}
        self.policies = {}

    def full_ns_labels(self, ns):
        d = dict(self.ns_labels[ns])
        d[NS_LABEL_KEY] = ns
        return d

    def apply(self, action):
        (kind, arg), = action.items()
        if kind in ("createPolicy", "updatePolicy"):
            key = "%s/%s" % (arg["metadata"]["namespace"], arg["metadata"]["name"])
            assert (key in self.policies) == (kind == "updatePolicy"), key
            self.policies[key] = arg
        elif kind == "deletePolicy":
            del self.policies[arg]
        elif kind == "setPodLabels":
            self.pod_labels[arg["pod"]] = dict(arg["labels"])
        elif kind == "setNamespaceLabels":
            self.ns_labels[arg["namespace"]] = dict(arg["labels"])
        else:
            raise ValueError(kind)

    def peer_matches(self, pol_ns, pr, other):
        if "ipBlock" in pr:
            ip = ipaddress.ip_address(FAKE_IP[other])
            if ip not in ipaddress.ip_network(subst(pr["ipBlock"]["cidr"]), strict=False):
                return False
            return not any(ip in ipaddress.ip_network(subst(e), strict=False)
                           for e in pr["ipBlock"].get("except") or [])
        ons = other.split("/")[0]
        if "namespaceSelector" in pr:
            if not match_sel(pr["namespaceSelector"], self.full_ns_labels(ons)):
                return False
        elif ons != pol_ns:
            return False
        if "podSelector" in pr:
            return match_sel(pr["podSelector"], self.pod_labels[other])
        return True

    def port_matches(self, ports, dst, proto, port):
        if not ports:
            return True
        for pp in ports:
            if pp.get("protocol", "TCP") != proto:  # API server defaults to TCP
                continue
            want = pp.get("port")
            if want is None:
                return True
            if isinstance(want, int) and want == port:
                return True
            if isinstance(want, str) and want == "serve-%d-%s" % (port, proto.lower()):
                return True  # every pod names its ports serve-<port>-<proto>
        return False

    def direction_allows(self, pod, other, ptype, dst, proto, port):
        ns = pod.split("/")[0]
        selecting = [p for k, p in sorted(self.policies.items())
                     if p["metadata"]["namespace"] == ns
                     and ptype in p["spec"]["policyTypes"]
                     and match_sel(p["spec"]["podSelector"], self.pod_labels[pod])]
        if not selecting:
            return True
        key, peers_key = ("ingress", "from") if ptype == "Ingress" else ("egress", "to")
        for p in selecting:
            for r in p["spec"].get(key) or []:
                peers = r.get(peers_key) or []
                if (not peers or any(self.peer_matches(ns, pr, other) for pr in peers)) \
                        and self.port_matches(r.get("ports"), dst, proto, port):
                    return True
        return False

    def allowed(self, src, dst, proto, port):
        return (self.direction_allows(src, dst, "Egress", dst, proto, port)
                and self.direction_allows(dst, src, "Ingress", dst, proto, port))


# --------------------------------------------------------------------------
# Spec recording
# --------------------------------------------------------------------------
class Spec:
    """Collects the steps of one It(): actions then ValidateOrFail calls."""

    def __init__(self, pods):
        self.pods = pods
        self.steps = []
        self._actions = []
        self._expects = []

    def reach(self, default=True):
        return Reachability(self.pods, default)

    def act(self, **kw):
        (k, v), = kw.items()
        if self._expects:  # a new action after probes starts a new step
            self._flush()
        self._actions.append({k: v})

    def validate(self, port, proto, reach):
        self._expects.append((proto, port, reach))

    def _flush(self):
        self.steps.append((self._actions, self._expects))
        self._actions, self._expects = [], []

    def done(self):
        if self._actions or self._expects:
            self._flush()
        return self.steps


SPECS = []


def spec(title, context, protocols, upstream_pods):
    def deco(fn):
        SPECS.append((title, context, protocols, upstream_pods, fn))
        return fn
    return deco


TCP, UDP, SCTP = "TCP", "UDP", "SCTP"


def create(s, pol, ns):
    s.act(createPolicy=in_ns(pol, ns))


def update(s, pol, ns):
    s.act(updatePolicy=in_ns(pol, ns))


# ----------------------------- TCP context --------------------------------
@spec("should support a 'default-deny-ingress' policy", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "y/b"])
def _(s):
    create(s, gen_policy("deny-ingress", sel(), ingress=[]), "x")
    r = s.reach(); r.expect_peer(P(), P("x"), False)
    s.validate(80, TCP, r)


@spec("should support a 'default-deny-all' policy", CTX_TCP, [TCP], ["x/a", "x/b", "y/a"])
def _(s):
    create(s, gen_policy("deny-all", sel(), ingress=[], egress=[]), "x")
    r = s.reach(); r.expect_peer(P(), P("x"), False); r.expect_peer(P("x"), P(), False)
    s.validate(80, TCP, r)


@spec("should enforce policy to allow traffic from pods within server namespace based on PodSelector", CTX_TCP, [TCP], ["x/a", "x/b", "x/c", "y/a"])
def _(s):
    rl = ingress_from(peer(pod_selector=sel({"pod": "b"})))
    create(s, gen_policy("x-a-allows-x-b", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_all_ingress("x/a", False); r.expect("x/b", "x/a", True)
    s.validate(80, TCP, r)


@spec("should enforce policy to allow ingress traffic for a target", CTX_TCP, [TCP], ["x/a", "x/b", "y/a"])
def _(s):
    create(s, gen_policy("deny-all", sel(), ingress=[]), "x")
    rl = ingress_from(peer(pod_selector=sel(), ns_selector=sel()))
    create(s, gen_policy("allow-all-to-a", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_all_ingress("x/a", True); r.expect_all_ingress("x/b", False)
    s.validate(80, TCP, r)


@spec("should enforce policy to allow ingress traffic from pods in all namespaces", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "z/a"])
def _(s):
    rl = ingress_from(peer(ns_selector=sel({})))
    create(s, gen_policy("allow-from-another-ns", sel({"pod": "a"}), ingress=[rl]), "x")
    s.validate(80, TCP, s.reach())


@spec("should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "z/a"])
def _(s):
    rl = ingress_from(peer(ns_selector=sel({NS_LABEL_KEY: "y"})))
    create(s, gen_policy("allow-client-a-via-ns-selector", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_peer(P("x"), P("x", "a"), False); r.expect_peer(P("z"), P("x", "a"), False)
    s.validate(80, TCP, r)


@spec("should enforce policy based on PodSelector with MatchExpressions", CTX_TCP, [TCP], ["x/a", "x/b", "y/a"])
def _(s):
    rl = ingress_from(peer(pod_selector=sel(exprs=[expr("pod", "In", ["b"])])))
    create(s, gen_policy("x-a-allows-x-b", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_all_ingress("x/a", False); r.expect("x/b", "x/a", True)
    s.validate(80, TCP, r)


@spec("should enforce policy based on NamespaceSelector with MatchExpressions", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "z/a"])
def _(s):
    rl = ingress_from(peer(ns_selector=sel(exprs=[expr(NS_LABEL_KEY, "In", ["y"])])))
    create(s, gen_policy("allow-ns-y-match-selector", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_peer(P("x"), P("x", "a"), False); r.expect_peer(P("z"), P("x", "a"), False)
    s.validate(80, TCP, r)


@spec("should enforce policy based on PodSelector or NamespaceSelector", CTX_TCP, [TCP], ["x/a", "x/b", "x/c", "y/a"])
def _(s):
    rl = ingress_from(peer(ns_selector=sel(exprs=[expr(NS_LABEL_KEY, "NotIn", ["x"])])),
                      peer(pod_selector=sel({"pod": "b"})))
    create(s, gen_policy("allow-ns-y-match-selector", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect("x/a", "x/a", False); r.expect("x/c", "x/a", False)
    s.validate(80, TCP, r)


@spec("should enforce policy based on PodSelector and NamespaceSelector", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "y/b", "z/b"])
def _(s):
    rl = ingress_from(peer(ns_selector=sel(exprs=[expr(NS_LABEL_KEY, "NotIn", ["x"])]),
                           pod_selector=sel({"pod": "b"})))
    create(s, gen_policy("allow-ns-y-podselector-and-nsselector", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_all_ingress("x/a", False); r.expect("y/b", "x/a", True); r.expect("z/b", "x/a", True)
    s.validate(80, TCP, r)


@spec("should enforce policy based on Multiple PodSelectors and NamespaceSelectors", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "y/b", "y/c"])
def _(s):
    rl = ingress_from(peer(ns_selector=sel(exprs=[expr(NS_LABEL_KEY, "NotIn", ["x"])]),
                           pod_selector=sel(exprs=[expr("pod", "In", ["b", "c"])])))
    create(s, gen_policy("allow-ns-y-z-pod-b-c", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_peer(P("x"), P("x", "a"), False); r.expect("y/a", "x/a", False)
    s.validate(80, TCP, r)


@spec("should enforce policy based on any PodSelectors", CTX_TCP, [TCP], ["x/a", "x/b", "x/c"])
def _(s):
    rl = ingress_from(peer(pod_selector=sel({"pod": "b"})), peer(pod_selector=sel({"pod": "c"})))
    create(s, gen_policy("allow-ns-x-pod-b-c", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_all_ingress("x/a", False)
    r.expect("x/b", "x/a", True); r.expect("x/c", "x/a", True)
    s.validate(80, TCP, r)


def _only_from_ya(s, proto):
    rl = ingress_from(peer(ns_selector=sel({NS_LABEL_KEY: "y"}), pod_selector=sel({"pod": "a"})))
    create(s, gen_policy("allow-ns-y-pod-a-via-namespace-pod-selector", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_all_ingress("x/a", False); r.expect("y/a", "x/a", True)
    s.validate(80, proto, r)


@spec("should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "y/b", "z/a"])
def _(s):
    _only_from_ya(s, TCP)


@spec("should enforce policy based on Ports", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "y/b", "z/a"])
def _(s):
    rl = rule([peer(ns_selector=sel({NS_LABEL_KEY: "y"}))], [np_port(81, TCP)])
    create(s, gen_policy("allow-client-a-via-ns-selector", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach()
    r.expect_peer(P("x"), P("x", "a"), False); r.expect_peer(P("y"), P("x", "a"), True)
    r.expect_peer(P("z"), P("x", "a"), False)
    s.validate(81, TCP, r)


@spec("should enforce multiple, stacked policies with overlapping podSelectors", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "y/b", "z/a"])
def _(s):
    nsy = sel({NS_LABEL_KEY: "y"})
    create(s, gen_policy("allow-client-a-via-ns-selector", sel({"pod": "a"}),
                         ingress=[rule([peer(ns_selector=nsy)], [np_port(81, TCP)])]), "x")
    allow = s.reach()
    allow.expect_peer(P("x"), P("x", "a"), False); allow.expect_peer(P("y"), P("x", "a"), True)
    allow.expect_peer(P("z"), P("x", "a"), False)
    s.validate(81, TCP, allow)
    deny = s.reach(); deny.expect_all_ingress("x/a", False)
    s.validate(80, TCP, deny)
    create(s, gen_policy("allow-client-a-via-ns-selector-80", sel({"pod": "a"}),
                         ingress=[rule([peer(ns_selector=nsy)], [np_port(80, TCP)])]), "x")
    s.validate(80, TCP, allow)


@spec("should support allow-all policy", CTX_TCP, [TCP], ["x/a", "x/b", "y/a"])
def _(s):
    create(s, gen_policy("allow-all", sel({}), ingress=[{}]), "x")
    r = s.reach()
    s.validate(80, TCP, r); s.validate(81, TCP, r)


@spec("should allow ingress access on one named port", CTX_TCP, [TCP], ["x/a", "x/b", "y/a"])
def _(s):
    create(s, gen_policy("allow-all", sel({}), ingress=[rule(None, [np_port("serve-81-tcp")])]), "x")
    s.validate(81, TCP, s.reach())
    r80 = s.reach(); r80.expect_peer(P(), P("x"), False)
    s.validate(80, TCP, r80)


@spec("should allow ingress access from namespace on one named port", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "z/a"])
def _(s):
    rl = rule([peer(ns_selector=sel({NS_LABEL_KEY: "y"}))], [np_port("serve-80-tcp", TCP)])
    create(s, gen_policy("allow-client-a-via-ns-selector-80", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_peer(P("x"), P("x", "a"), False); r.expect_peer(P("z"), P("x", "a"), False)
    s.validate(80, TCP, r)
    rf = s.reach(); rf.expect_all_ingress("x/a", False)
    s.validate(81, TCP, rf)


@spec("should allow egress access on one named port", CTX_TCP, [TCP], ["x/a", "y/a"])
def _(s):
    create(s, gen_policy("allow-egress", sel({}), egress=[rule(None, [np_port("serve-80-tcp")], "to")]), "x")
    s.validate(80, TCP, s.reach())
    r81 = s.reach(); r81.expect_peer(P("x"), P(), False)
    s.validate(81, TCP, r81)


@spec("should enforce updated policy", CTX_TCP, [TCP], ["x/a", "y/a"])
def _(s):
    pol = gen_policy("allow-all-mutate-to-deny-all", sel({}), ingress=[{}])
    create(s, pol, "x")
    s.validate(81, TCP, s.reach())
    pol = copy.deepcopy(pol)
    del pol["spec"]["ingress"]  # policy.Spec.Ingress = []NetworkPolicyIngressRule{} (omitted on the wire)
    update(s, pol, "x")
    r = s.reach(); r.expect_peer(P(), P("x"), False)
    s.validate(81, TCP, r)


@spec("should allow ingress access from updated namespace", CTX_TCP, [TCP], ["x/a", "y/a"])
def _(s):
    rl = ingress_from(peer(ns_selector=sel({"ns2": "updated"})))
    create(s, gen_policy("allow-client-a-via-ns-selector", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_all_ingress("x/a", False)
    s.validate(80, TCP, r)
    s.act(setNamespaceLabels={"namespace": "y", "labels": {"ns": "y", "ns2": "updated"}})
    r2 = s.reach(); r2.expect_all_ingress("x/a", False); r2.expect_peer(P("y"), P(), True)
    s.validate(80, TCP, r2)


@spec("should allow ingress access from updated pod", CTX_TCP, [TCP], ["x/a", "x/b"])
def _(s):
    match = {"pod": "b", "pod2": "updated"}
    rl = ingress_from(peer(pod_selector=sel(match)))
    create(s, gen_policy("allow-client-a-via-pod-selector", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_all_ingress("x/a", False)
    s.validate(80, TCP, r)
    s.act(setPodLabels={"pod": "x/b", "labels": {"pod": "b", "pod2": "updated"}})
    r2 = s.reach(); r2.expect_all_ingress("x/a", False); r2.expect("x/b", "x/a", True)
    s.validate(80, TCP, r2)


@spec("should deny ingress from pods on other namespaces", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "z/a"])
def _(s):
    rl = ingress_from(peer(pod_selector=sel({})))
    create(s, gen_policy("deny-empty-policy", sel(), ingress=[rl]), "x")
    r = s.reach(); r.expect_peer(P("y"), P("x"), False); r.expect_peer(P("z"), P("x"), False)
    s.validate(80, TCP, r)


@spec("should deny ingress access to updated pod", CTX_TCP, [TCP], ["x/a", "y/a"])
def _(s):
    create(s, gen_policy("deny-ingress-via-label-selector", sel({"target": "isolated"}), ingress=[]), "x")
    s.validate(80, TCP, s.reach())
    s.act(setPodLabels={"pod": "x/a", "labels": {"pod": "a", "target": "isolated"}})
    r = s.reach(); r.expect_all_ingress("x/a", False)
    s.validate(80, TCP, r)


@spec("should deny egress from pods based on PodSelector", CTX_TCP, [TCP], ["x/a", "x/b", "y/a"])
def _(s):
    create(s, gen_policy("deny-egress-pod-a", sel({"pod": "a"}), egress=[]), "x")
    r = s.reach(); r.expect_all_egress("x/a", False)
    s.validate(80, TCP, r)


@spec("should deny egress from all pods in a namespace", CTX_TCP, [TCP], ["x/a", "x/b", "y/a"])
def _(s):
    create(s, gen_policy("deny-egress-ns-x", sel(), egress=[]), "x")
    r = s.reach(); r.expect_peer(P("x"), P(), False)
    s.validate(80, TCP, r)


@spec("should work with Ingress, Egress specified together", CTX_TCP, [TCP], ["x/a", "x/b", "x/c", "y/a"])
def _(s):
    rl = ingress_from(peer(pod_selector=sel({"pod": "b"})))
    pol = gen_policy("allow-client-a-via-pod-selector", sel({"pod": "a"}), ingress=[rl])
    pol["spec"]["egress"] = [{"ports": [{"port": 80}]}]
    pol["spec"]["policyTypes"] = ["Egress", "Ingress"]
    create(s, pol, "x")
    r80 = s.reach(); r80.expect_all_ingress("x/a", False); r80.expect("x/b", "x/a", True)
    s.validate(80, TCP, r80)
    r81 = s.reach(); r81.expect_all_ingress("x/a", False); r81.expect_all_egress("x/a", False)
    r81.expect("x/b", "x/a", True)
    s.validate(81, TCP, r81)


@spec("should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)", CTX_TCP, [TCP], ["x/a", "y/a", "y/b"])
def _(s):
    e1 = egress_to(peer(ns_selector=sel({NS_LABEL_KEY: "y"}), pod_selector=sel({"pod": "a"})))
    create(s, gen_policy("allow-to-ns-y-pod-a", sel({"pod": "a"}), egress=[e1]), "x")
    ir = ingress_from(peer(ns_selector=sel({NS_LABEL_KEY: "x"}), pod_selector=sel({"pod": "a"})))
    create(s, gen_policy("allow-from-xa-on-ya-match-selector", sel({"pod": "a"}), ingress=[ir]), "y")
    create(s, gen_policy("allow-from-xa-on-yb-match-selector", sel({"pod": "b"}), ingress=[ir]), "y")
    r = s.reach()
    r.expect_peer(P("x", "a"), P(), False)
    r.expect_peer(P(), P("y", "a"), False)
    r.expect_peer(P("x", "a"), P("y", "a"), True)
    r.expect_peer(P(), P("y", "b"), False)
    s.validate(80, TCP, r)


@spec("should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector", CTX_TCP, [TCP], ["x/a", "y/a", "y/b"])
def _(s):
    e1 = egress_to(peer(ns_selector=sel({NS_LABEL_KEY: "y"}), pod_selector=sel({"pod": "a"})))
    create(s, gen_policy("allow-to-ns-y-pod-a", sel({"pod": "a"}), egress=[e1]), "x")
    r = s.reach(); r.expect_all_egress("x/a", False); r.expect("x/a", "y/a", True)
    s.validate(80, TCP, r)


@spec("should enforce ingress policy allowing any port traffic to a server on a specific protocol", CTX_TCP, [TCP, UDP], ["x/a", "y/a"])
def _(s):
    create(s, gen_policy("allow-ingress-by-proto", sel({"pod": "a"}),
                         ingress=[rule(None, [np_port(None, TCP)])]), "x")
    s.validate(80, TCP, s.reach())
    ru = s.reach(); ru.expect_peer(P(), P("x", "a"), False)
    s.validate(80, UDP, ru)


@spec("should enforce multiple ingress policies with ingress allow-all policy taking precedence", CTX_TCP, [TCP], ["x/a", "y/a"])
def _(s):
    create(s, gen_policy("allow-ingress-port-80", sel({}), ingress=[rule(None, [np_port(80)])]), "x")
    r = s.reach(); r.expect_peer(P(), P("x"), False)
    s.validate(81, TCP, r)
    create(s, gen_policy("allow-ingress", sel({}), ingress=[{}]), "x")
    s.validate(81, TCP, s.reach())


@spec("should enforce multiple egress policies with egress allow-all policy taking precedence", CTX_TCP, [TCP], ["x/a", "y/a"])
def _(s):
    create(s, gen_policy("allow-egress-port-80", sel({}), egress=[rule(None, [np_port(80)], "to")]), "x")
    r = s.reach(); r.expect_peer(P("x"), P(), False)
    s.validate(81, TCP, r)
    create(s, gen_policy("allow-egress", sel({}), egress=[{}]), "x")
    s.validate(81, TCP, s.reach())


@spec("should stop enforcing policies after they are deleted", CTX_TCP, [TCP], ["x/a", "y/a"])
def _(s):
    create(s, gen_policy("deny-all", sel(), ingress=[], egress=[]), "x")
    r = s.reach(); r.expect_peer(P("x"), P(), False); r.expect_peer(P(), P("x"), False)
    s.validate(80, TCP, r)
    s.act(deletePolicy="x/deny-all")  # k8s.cleanNetworkPolicies: deletes every policy in x, y, z
    s.validate(80, TCP, s.reach())


@spec("should allow egress access to server in CIDR block", CTX_TCP, [TCP], ["x/a", "y/a", "y/b"])
def _(s):
    e1 = egress_to(peer(ip_block={"cidr": "{{cidr y/b 32}}"}))
    create(s, gen_policy("allow-client-a-via-cidr-egress-rule", sel({"pod": "a"}), egress=[e1]), "x")
    r = s.reach(); r.expect_all_egress("x/a", False); r.expect("x/a", "y/b", True)
    s.validate(80, TCP, r)


@spec("should enforce except clause while egress access to server in CIDR block", CTX_TCP, [TCP], ["x/a", "x/b", "x/c"])
def _(s):
    e1 = egress_to(peer(ip_block={"cidr": "{{cidr x/b 4}}", "except": ["{{cidr x/b 32}}"]}))
    create(s, gen_policy("allow-client-a-via-cidr-egress-rule", sel({"pod": "a"}), egress=[e1]), "x")
    r = s.reach(); r.expect("x/a", "x/b", False)
    s.validate(80, TCP, r)


@spec("should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed", CTX_TCP, [TCP], ["x/a", "x/b", "x/c"])
def _(s):
    e1 = egress_to(peer(ip_block={"cidr": "{{cidr x/b 4}}", "except": ["{{cidr x/b 32}}"]}))
    create(s, gen_policy("allow-client-a-via-cidr-egress-rule", sel({"pod": "a"}), egress=[e1]), "x")
    r = s.reach(); r.expect("x/a", "x/b", False)
    s.validate(80, TCP, r)
    e3 = egress_to(peer(ip_block={"cidr": "{{cidr x/b 32}}"}))
    update(s, gen_policy("allow-client-a-via-cidr-egress-rule", sel({"pod": "a"}), egress=[e3]), "x")
    ra = s.reach(); ra.expect_all_egress("x/a", False); ra.expect("x/a", "x/b", True)
    s.validate(80, TCP, ra)


@spec("should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector", CTX_TCP, [TCP], ["x/a", "x/b", "y/a"])
def _(s):
    target = {"pod": "a"}
    create(s, gen_policy("allow-egress-for-target", sel(target), egress=[{}]), "x")
    s.validate(80, TCP, s.reach())
    create(s, gen_policy("deny-ingress-via-label-selector", sel(target), ingress=[]), "x")
    r = s.reach(); r.expect_all_ingress("x/a", False)
    s.validate(80, TCP, r)


@spec("should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP", CTX_TCP, [TCP], ["x/a", "y/a"])
def _(s):
    create(s, gen_policy("deny-ingress", sel(), ingress=[]), "x")
    create(s, gen_policy("allow-only-sctp-ingress-on-port-81", sel({"pod": "a"}),
                         ingress=[rule(None, [np_port(81, SCTP)])]), "x")
    r = s.reach(); r.expect_peer(P(), P("x"), False)
    s.validate(81, TCP, r)


@spec("should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP", CTX_TCP, [TCP], ["x/a", "y/a"])
def _(s):
    create(s, gen_policy("allow-only-sctp-ingress-on-port-80", sel({"pod": "a"}),
                         ingress=[rule(None, [np_port(80, SCTP)])]), "x")
    r = s.reach(); r.expect_all_ingress("x/a", False)
    s.validate(81, TCP, r)


@spec("should not allow access by TCP when a policy specifies only UDP", CTX_TCP, [TCP], ["x/a", "y/a"])
def _(s):
    create(s, gen_policy("allow-only-udp-ingress-on-port-81", sel({"pod": "a"}),
                         ingress=[rule(None, [np_port(81, UDP)])]), "x")
    r = s.reach(); r.expect_all_ingress("x/a", False)
    s.validate(81, TCP, r)


@spec("should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "z/a"])
def _(s):
    rl = ingress_from(peer(ns_selector=sel({NS_LABEL_KEY: "y"})))
    create(s, gen_policy("allow-client-a-via-ns-selector-for-immutable-ns-label", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_peer(P("x"), P("x", "a"), False); r.expect_peer(P("z"), P("x", "a"), False)
    s.validate(80, TCP, r)


@spec("should enforce policy based on NamespaceSelector with MatchExpressions using default ns label", CTX_TCP, [TCP], ["x/a", "x/b", "y/a", "z/a"])
def _(s):
    er = egress_to(peer(ns_selector=sel(exprs=[expr(NS_LABEL_KEY, "NotIn", ["y"])])))
    create(s, gen_policy("allow-ns-y-match-selector-for-immutable-ns-label", sel({"pod": "a"}), egress=[er]), "x")
    r = s.reach(); r.expect_peer(P("x", "a"), P("y"), False)
    s.validate(80, TCP, r)


# --------------------------- UDP / SCTP contexts ---------------------------
def _default_deny(s, proto):
    create(s, gen_policy("deny-all", sel(), ingress=[]), "x")
    r = s.reach(); r.expect_peer(P(), P("x"), False)
    s.validate(80, proto, r)


def _ports(s, proto):
    rl = rule([peer(ns_selector=sel({NS_LABEL_KEY: "y"}))], [np_port(81, proto)])
    create(s, gen_policy("allow-ingress-on-port-81-ns-x", sel({"pod": "a"}), ingress=[rl]), "x")
    r = s.reach(); r.expect_peer(P("x"), P("x", "a"), False); r.expect_peer(P("z"), P("x", "a"), False)
    s.validate(81, proto, r)


for _ctx, _proto in ((CTX_UDP, UDP), (CTX_SCTP, SCTP)):
    spec("should support a 'default-deny-ingress' policy", _ctx, [_proto], ["x/a", "x/b", "y/a", "y/b"])(
        lambda s, p=_proto: _default_deny(s, p))
    spec("should enforce policy based on Ports", _ctx, [_proto], ["x/a", "x/b", "y/a", "z/a"])(
        lambda s, p=_proto: _ports(s, p))
    spec("should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
         _ctx, [_proto], ["x/a", "x/b", "y/a"])(lambda s, p=_proto: _only_from_ya(s, p))


# --------------------------------------------------------------------------
def grid_string(fn):
    return ["".join("." if (f == t or fn(f, t)) else "X" for t in ALL) for f in ALL]


def build():
    cases, report = [], []
    for title, ctx, protos, upods, fn in SPECS:
        # 1) upstream topology: the Expect* calls must be valid there (no Failf)
        up_steps = fn_run(fn, upods)
        # 2) all nine pods: extended upstream Reachability (for the report only)
        ext_steps = fn_run(fn, ALL)
        state = State()
        steps_out, extrap = [], []
        for si, ((actions, exps), (_, ext_exps)) in enumerate(zip(up_steps, ext_steps)):
            for a in actions:
                state.apply(a)
            exp_out = []
            for (proto, port, r), (_, _, rx) in zip(exps, ext_exps):
                assert proto in protos, (title, proto)
                ev = lambda f, t: state.allowed(f, t, proto, port)
                for f in upods:
                    for t in upods:
                        if f != t and r.v[f][t] != ev(f, t):
                            raise SystemExit("MISMATCH %s step %d %s/%d %s->%s upstream=%s evaluator=%s"
                                             % (title, si, proto, port, f, t, r.v[f][t], ev(f, t)))
                for f in ALL:
                    for t in ALL:
                        if f != t and rx.v[f][t] != ev(f, t):
                            extrap.append("step %d %s/%d %s->%s: upstream-Expect-on-9-pods=%s, policy semantics=%s"
                                          % (si, proto, port, f, t, "." if rx.v[f][t] else "X", "." if ev(f, t) else "X"))
                exp_out.append({"protocol": proto, "port": port, "grid": grid_string(ev)})
            steps_out.append({"actions": actions, "expect": exp_out})
        cases.append({"name": title, "context": ctx, "protocols": protos,
                      "upstreamPods": upods, "steps": steps_out})
        report.append((title, ctx, extrap))
    return cases, report


def fn_run(fn, pods):
    s = Spec(pods)
    fn(s)
    return s.done()


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "cases.json")
    cases, report = build()
    doc = {
        "upstream": UPSTREAM,
        "model": {
            "namespaces": NAMESPACES,
            "pods": PODS,
            "ports": PORTS,
            "namespaceLabels": {n: {"ns": n} for n in NAMESPACES},
            "podLabels": {p: {"pod": p} for p in PODS},
            "containerPorts": [{"name": "serve-%d-%s" % (port, proto.lower()), "port": port, "protocol": proto}
                               for port in PORTS for proto in PROTOS],
        },
        "cases": cases,
        "notPorted": [],
    }
    with open(out, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    for title, ctx, extrap in report:
        if extrap:
            print("[%s] %s" % (ctx, title))
            for e in extrap:
                print("    " + e)
    print("wrote %s: %d cases" % (out, len(cases)))


if __name__ == "__main__":
    main()
