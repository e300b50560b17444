#!/usr/bin/env python3
"""Validate tests/netpol/cases.json (python3 stdlib only).

usage: check_cases.py [--cases PATH] [--regen] [UPSTREAM_network_policy.go]

  --cases PATH   cases file (default: cases.json next to this script)
  --regen        also re-run gen_cases.py's generator in memory and require the
                 file to be byte-for-byte what it would produce
  UPSTREAM       path to upstream test/e2e/network/netpol/network_policy.go
                 (or any text containing its ginkgo.Context(...) / f.It(...) /
                 ginkgo.It(...) lines): every It() title must appear, under its
                 Context, exactly as often in cases + notPorted as upstream.
Exit status 0 = valid; prints counts (cases, steps, expectations, cells).
"""
import collections
import json
import os
import re
import sys

NS = ["x", "y", "z"]
PODS = ["a", "b", "c"]
ALL = ["%s/%s" % (n, p) for n in NS for p in PODS]
PROTOS = {"TCP", "UDP", "SCTP"}
ACTIONS = {"createPolicy", "updatePolicy", "deletePolicy", "setPodLabels", "setNamespaceLabels"}
TEMPLATE = re.compile(r"^\{\{(?:ip ([xyz]/[abc])|cidr ([xyz]/[abc]) (\d{1,2}))\}\}$")
IT_RE = re.compile(r'\b(?:f|ginkgo)\.It\(\s*"((?:[^"\\]|\\.)*)"')
CTX_RE = re.compile(r'\bginkgo\.Context\(\s*"((?:[^"\\]|\\.)*)"')

errors = []


def err(where, msg):
    errors.append("%s: %s" % (where, msg))


def walk_strings(obj, where):
    if isinstance(obj, dict):
        for k, v in obj.items():
            walk_strings(v, where)
    elif isinstance(obj, list):
        for v in obj:
            walk_strings(v, where)
    elif isinstance(obj, str) and "{{" in obj:
        m = TEMPLATE.match(obj)
        if not m:
            err(where, "bad template %r (allowed: {{ip NS/POD}}, {{cidr NS/POD LEN}})" % obj)
        elif m.group(3) is not None and not 0 <= int(m.group(3)) <= 32:
            err(where, "bad prefix length in %r" % obj)


def check_policy(p, where):
    if not isinstance(p, dict):
        return err(where, "policy is not an object")
    if p.get("apiVersion") != "networking.k8s.io/v1":
        err(where, "apiVersion must be networking.k8s.io/v1")
    if p.get("kind") != "NetworkPolicy":
        err(where, "kind must be NetworkPolicy")
    md = p.get("metadata") or {}
    if not isinstance(md.get("name"), str) or not md.get("name"):
        err(where, "metadata.name missing")
    if md.get("namespace") not in NS:
        err(where, "metadata.namespace must be one of x/y/z, got %r" % md.get("namespace"))
    spec = p.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("podSelector"), dict):
        err(where, "spec.podSelector missing")
        return
    for t in spec.get("policyTypes", []):
        if t not in ("Ingress", "Egress"):
            err(where, "bad policyType %r" % t)
    for key, pk in (("ingress", "from"), ("egress", "to")):
        for r in spec.get(key) or []:
            for port in r.get("ports") or []:
                if port.get("protocol", "TCP") not in PROTOS:
                    err(where, "bad port protocol %r" % port.get("protocol"))
            for peer in r.get(pk) or []:
                if not peer or not set(peer) <= {"podSelector", "namespaceSelector", "ipBlock"}:
                    err(where, "bad peer %r" % peer)
                if "ipBlock" in peer and len(peer) != 1:
                    err(where, "ipBlock peer must stand alone")
    walk_strings(p, where)


def check_action(a, where):
    if not isinstance(a, dict) or len(a) != 1:
        return err(where, "action must be a one-key object")
    (kind, arg), = a.items()
    if kind not in ACTIONS:
        return err(where, "unknown action %r" % kind)
    if kind in ("createPolicy", "updatePolicy"):
        check_policy(arg, "%s %s" % (where, kind))
    elif kind == "deletePolicy":
        if not isinstance(arg, str) or arg.count("/") != 1 or arg.split("/")[0] not in NS or not arg.split("/")[1]:
            err(where, "deletePolicy must be \"NS/NAME\", got %r" % (arg,))
    elif kind == "setPodLabels":
        if arg.get("pod") not in ALL or not isinstance(arg.get("labels"), dict):
            err(where, "bad setPodLabels %r" % (arg,))
    elif kind == "setNamespaceLabels":
        if arg.get("namespace") not in NS or not isinstance(arg.get("labels"), dict):
            err(where, "bad setNamespaceLabels %r" % (arg,))
        elif "kubernetes.io/metadata.name" in arg["labels"]:
            err(where, "setNamespaceLabels must not carry kubernetes.io/metadata.name")


def check_grid(g, where):
    if not isinstance(g, list) or len(g) != 9:
        return err(where, "grid must be 9 strings")
    for i, row in enumerate(g):
        if not isinstance(row, str) or len(row) != 9 or set(row) - {".", "X"}:
            err(where, "grid row %d (%s) must be 9 chars of '.'/'X': %r" % (i, ALL[i], row))
        elif row[i] != ".":
            err(where, "grid diagonal %s->%s must be '.'" % (ALL[i], ALL[i]))


def upstream_titles(path):
    ctx, out = "", []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            m = CTX_RE.search(line)
            if m:
                ctx = m.group(1)
            m = IT_RE.search(line)
            if m:
                out.append((ctx, json.loads('"%s"' % m.group(1))))
    return out


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    cases_path, regen, upstream = os.path.join(here, "cases.json"), False, None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--cases":
            cases_path = args.pop(0)
        elif a == "--regen":
            regen = True
        elif a.startswith("-"):
            sys.exit(__doc__)
        else:
            upstream = a

    with open(cases_path, encoding="utf-8") as fh:
        raw = fh.read()
    try:
        doc = json.loads(raw)
    except ValueError as e:
        sys.exit("invalid JSON: %s" % e)

    up = doc.get("upstream") or {}
    if up.get("repo") != "kubernetes/kubernetes" or not re.fullmatch(r"[0-9a-f]{40}", up.get("commit", "")) \
            or up.get("file") != "test/e2e/network/netpol/network_policy.go":
        err("upstream", "repo/commit/file missing or wrong")
    model = doc.get("model") or {}
    if model.get("namespaces") != NS or model.get("pods") != PODS or model.get("ports") != [80, 81]:
        err("model", "namespaces/pods/ports must be x,y,z / a,b,c / 80,81")
    if model.get("namespaceLabels") != {n: {"ns": n} for n in NS}:
        err("model", "namespaceLabels wrong")
    if model.get("podLabels") != {p: {"pod": p} for p in PODS}:
        err("model", "podLabels wrong")
    for cp in model.get("containerPorts") or []:
        if cp.get("name") != "serve-%s-%s" % (cp.get("port"), str(cp.get("protocol")).lower()) \
                or cp.get("protocol") not in PROTOS:
            err("model", "bad containerPort %r" % cp)

    n_steps = n_exp = n_cells = n_deny = 0
    covered = collections.Counter()
    for ci, c in enumerate(doc.get("cases") or []):
        where = "case %d (%s)" % (ci, c.get("name"))
        if not isinstance(c.get("name"), str) or not c["name"]:
            err(where, "name missing")
        protos = c.get("protocols")
        if not protos or not isinstance(protos, list) or set(protos) - PROTOS or len(set(protos)) != len(protos):
            err(where, "protocols must be a non-empty list of TCP/UDP/SCTP")
            protos = []
        if "upstreamPods" in c and (not isinstance(c["upstreamPods"], list) or set(c["upstreamPods"]) - set(ALL)):
            err(where, "upstreamPods must list pods of x,y,z/a,b,c")
        if not c.get("steps"):
            err(where, "no steps")
        for si, st in enumerate(c.get("steps") or []):
            sw = "%s step %d" % (where, si)
            n_steps += 1
            if not isinstance(st.get("actions"), list) or not isinstance(st.get("expect"), list):
                err(sw, "actions and expect must be lists")
                continue
            for a in st["actions"]:
                check_action(a, sw)
            for e in st["expect"]:
                n_exp += 1
                if e.get("protocol") not in protos:
                    err(sw, "expect protocol %r not among the case's protocols" % e.get("protocol"))
                if e.get("port") not in (80, 81):
                    err(sw, "expect port must be 80 or 81")
                check_grid(e.get("grid"), sw)
                if isinstance(e.get("grid"), list):
                    n_cells += 72
                    n_deny += sum(r.count("X") for r in e["grid"] if isinstance(r, str))
        covered[(c.get("context", ""), c.get("name"))] += 1
    for np_ in doc.get("notPorted") or []:
        if not np_.get("name") or not np_.get("reason"):
            err("notPorted", "entries need name and reason: %r" % np_)
        covered[(np_.get("context", ""), np_.get("name"))] += 1

    if upstream:
        titles = upstream_titles(upstream)
        want = collections.Counter(titles)
        if not titles:
            err("upstream", "no It() titles found in %s" % upstream)
        # match on (context, title) when the file carries contexts, else title only
        use_ctx = all(ctx for ctx, _ in covered)
        key = (lambda k: k) if use_ctx else (lambda k: k[1])
        w, h = collections.Counter(), collections.Counter()
        for k, n in want.items():
            w[key(k)] += n
        for k, n in covered.items():
            h[key(k)] += n
        for k in sorted(set(w) | set(h), key=str):
            if w[k] != h[k]:
                err("titles", "%r: upstream has %d, cases+notPorted have %d" % (k, w[k], h[k]))
        print("upstream It() titles: %d (%s)" % (len(titles), upstream))

    if regen:
        sys.path.insert(0, here)
        import gen_cases  # noqa: E402
        import tempfile
        with tempfile.NamedTemporaryFile("r", suffix=".json") as tmp:
            old = sys.stdout
            sys.stdout = open(os.devnull, "w")
            try:
                sys.argv = ["gen_cases.py", tmp.name]
                gen_cases.main()
            finally:
                sys.stdout.close()
                sys.stdout = old
            if open(tmp.name).read() != raw:
                err("regen", "cases.json differs from what gen_cases.py generates")
        print("regen: cases.json matches gen_cases.py output" if not any(e.startswith("regen") for e in errors) else "regen: MISMATCH")

    print("cases: %d, notPorted: %d, steps: %d, expectation entries: %d, cells checked: %d (72 per grid; %d expected X)"
          % (len(doc.get("cases") or []), len(doc.get("notPorted") or []), n_steps, n_exp, n_cells, n_deny))
    if errors:
        for e in errors:
            print("ERROR " + e)
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1:])
