# shellcheck shell=bash
# Helpers and assertions for weft's end-to-end tests. Sourced by tests/e2e/k3d.sh and by any
# other tier that has a cluster running weft (e.g. real kubelets on one machine); nothing here
# knows about docker or k3d.
#
# Needs: bash, kubectl (KUBECTL, default `kubectl`) with KUBECONFIG pointing at the cluster,
# awk, grep, od. Every function fails the test (exit 1, with a FAIL line) or returns 0.
#
# Settings (set before sourcing or before calling):
#   KUBECTL            kubectl binary (one word)
#   E2E_POD_NS         namespace of the test pods (default: default)
#   E2E_PCAP_READER    array: command that reads a pcap on stdin and takes a filter, e.g.
#                      (tcpdump) or (docker run --rm -i IMAGE tcpdump); used by e2e_pcap_count

: "${KUBECTL:=kubectl}"
: "${E2E_POD_NS:=default}"
E2E_WEFT_NS=weft-system
if ! declare -p E2E_PCAP_READER >/dev/null 2>&1; then
	E2E_PCAP_READER=(tcpdump)
fi

e2e_log() {
	printf '%s e2e: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
}

e2e_pass() {
	e2e_log "PASS: $*"
}

e2e_fail() {
	e2e_log "FAIL: $*"
	exit 1
}

e2e_k() {
	"$KUBECTL" "$@"
}

# A string that cannot occur by chance: weft-e2e- and 32 random hex digits.
e2e_random_marker() {
	printf 'weft-e2e-%s\n' "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
}

# What a failing test needs to be understood: pods, weft's objects and meshd's logs.
e2e_dump_diagnostics() {
	e2e_log "---- diagnostics ----"
	e2e_k get nodes -o wide >&2 || true
	e2e_k get pods -A -o wide >&2 || true
	e2e_k -n "$E2E_WEFT_NS" describe daemonset weft >&2 || true
	e2e_k get meshnodes -o wide >&2 || true
	e2e_k get meshpodcidrclaims >&2 || true
	e2e_k -n "$E2E_WEFT_NS" logs -l app.kubernetes.io/name=weft --all-containers --prefix \
		--tail=100 >&2 || true
	e2e_k get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -40 >&2 || true
	e2e_log "---- end of diagnostics ----"
}

# e2e_write_overlay DIR DEPLOY_DIR IMAGE [CNI_BIN_DIR CNI_CONF_DIR]: DIR/kustomization.yaml, the
# test overlay of deploy/: IMAGE (NAME:TAG) for weft's image, `imagePullPolicy: Never` (the
# image is imported, never pulled) and, when given, the host's CNI dirs where the runtime reads
# them (k3s); nothing else changes.
e2e_write_overlay() {
	local dir=$1 deploy=$2 image=$3 cni_bin=${4:-} cni_conf=${5:-} base
	mkdir -p "$dir"
	base=$(realpath --relative-to="$dir" "$deploy")
	cat >"$dir/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $base
images:
  - name: localhost/weft
    newName: ${image%:*}
    newTag: ${image##*:}
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata:
        name: weft
        namespace: weft-system
      spec:
        template:
          spec:
            initContainers:
              - name: install-cni
                imagePullPolicy: Never
            containers:
              - name: meshd
                imagePullPolicy: Never
EOF
	if [ -n "$cni_bin" ]; then
		cat >>"$dir/kustomization.yaml" <<EOF
            volumes:
              - name: cni-bin
                hostPath:
                  path: $cni_bin
                  type: DirectoryOrCreate
              - name: cni-conf
                hostPath:
                  path: $cni_conf
                  type: DirectoryOrCreate
EOF
	fi
}

# e2e_apply_overlay DIR IMAGE: renders the overlay, checks it sets IMAGE, applies it server-side
# and waits for weft's CRDs to be established.
e2e_apply_overlay() {
	local dir=$1 image=$2
	e2e_k kustomize "$dir" >"$dir/weft.yaml"
	grep -q "image: $image" "$dir/weft.yaml" || e2e_fail "the overlay did not set the image to $image"
	e2e_log "applying weft ($image)"
	e2e_k apply --server-side --field-manager=weft-e2e -f "$dir/weft.yaml" >&2
	e2e_k wait --for=condition=Established --timeout=60s \
		crd/meshnodes.weft.dev crd/meshnodehealths.weft.dev crd/meshpodcidrclaims.weft.dev \
		crd/meshpeers.weft.dev crd/meshrevocations.weft.dev crd/meshkeyrotations.weft.dev \
		crd/meshpskgenerations.weft.dev >&2
}

# e2e_wait_daemonset NAMESPACE NAME TIMEOUT_SECS
e2e_wait_daemonset() {
	local ns=$1 name=$2 timeout=$3
	if ! e2e_k -n "$ns" rollout status "daemonset/$name" --timeout="${timeout}s" >&2; then
		e2e_dump_diagnostics
		e2e_fail "daemonset $ns/$name not rolled out within ${timeout}s"
	fi
	e2e_pass "daemonset $ns/$name rolled out"
}

# e2e_wait_meshnodes COUNT TIMEOUT_SECS: COUNT MeshNodes with condition Ready=True.
e2e_wait_meshnodes() {
	local want=$1 timeout=$2 ready=0 deadline=$((SECONDS + $2))
	while [ "$SECONDS" -lt "$deadline" ]; do
		ready=$(e2e_k get meshnodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null |
			grep -c '^True$' || true)
		if [ "$ready" -ge "$want" ]; then
			e2e_pass "$ready MeshNodes Ready"
			return 0
		fi
		sleep 2
	done
	e2e_dump_diagnostics
	e2e_fail "only $ready of $want MeshNodes Ready after ${timeout}s"
}

# e2e_run_pod NAME NODE IMAGE [PULL_POLICY]: a pod that sleeps, pinned to NODE.
e2e_run_pod() {
	local name=$1 node=$2 image=$3 pull=${4:-IfNotPresent}
	e2e_k apply -f - >&2 <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
  namespace: $E2E_POD_NS
  labels:
    app.kubernetes.io/name: weft-e2e
spec:
  nodeName: $node
  terminationGracePeriodSeconds: 1
  tolerations:
    - operator: Exists
  containers:
    - name: main
      image: $image
      imagePullPolicy: $pull
      command: ["sleep", "86400"]
EOF
}

# e2e_wait_pod NAME TIMEOUT_SECS
e2e_wait_pod() {
	local name=$1 timeout=$2
	if ! e2e_k -n "$E2E_POD_NS" wait --for=condition=Ready "pod/$name" --timeout="${timeout}s" >&2; then
		e2e_k -n "$E2E_POD_NS" describe pod "$name" >&2 || true
		e2e_dump_diagnostics
		e2e_fail "pod $name not Ready within ${timeout}s"
	fi
}

# e2e_pod_ip NAME: prints the pod's IP.
e2e_pod_ip() {
	local ip
	ip=$(e2e_k -n "$E2E_POD_NS" get pod "$1" -o jsonpath='{.status.podIP}')
	[ -n "$ip" ] || e2e_fail "pod $1 has no IP"
	printf '%s\n' "$ip"
}

# e2e_exec POD CMD...: runs CMD in the pod's first container.
e2e_exec() {
	local pod=$1
	shift
	e2e_k -n "$E2E_POD_NS" exec "$pod" -- "$@"
}

# e2e_assert_ping FROM_POD IP [COUNT]
e2e_assert_ping() {
	local pod=$1 ip=$2 count=${3:-3} out
	if ! out=$(e2e_exec "$pod" ping -c "$count" -W 2 "$ip" 2>&1); then
		printf '%s\n' "$out" >&2
		e2e_dump_diagnostics
		e2e_fail "ping from $pod to $ip"
	fi
	e2e_pass "ping $pod -> $ip ($(printf '%s\n' "$out" | grep -E 'packets transmitted' || true))"
}

# e2e_capture_start PIDVAR FILE CMD...: runs CMD (which writes a pcap to stdout and ends by
# itself, e.g. `timeout 30 tcpdump -i eth0 -U -w -`) in the background into FILE; sets PIDVAR.
# Returns once the capture is listening (tcpdump's "listening on" line on stderr) or after 10 s.
e2e_capture_start() {
	local var=$1 file=$2 pid
	shift 2
	"$@" >"$file" 2>"$file.err" &
	pid=$!
	printf -v "$var" '%s' "$pid"
	for _ in $(seq 1 50); do
		if grep -q 'listening on' "$file.err" 2>/dev/null; then
			return 0
		fi
		if ! kill -0 "$pid" 2>/dev/null; then
			cat "$file.err" >&2 || true
			e2e_fail "capture into $file ended at once: $*"
		fi
		sleep 0.2
	done
	e2e_log "capture into $file: no 'listening on' after 10 s; going on"
}

# e2e_capture_wait PID FILE: waits for the capture to end; fails if it wrote nothing.
e2e_capture_wait() {
	local pid=$1 file=$2
	wait "$pid" || true
	# A pcap has a 24-byte header; anything less means the capture never ran.
	if [ ! -s "$file" ] || [ "$(wc -c <"$file")" -le 24 ]; then
		cat "$file.err" >&2 || true
		e2e_fail "capture $file is empty"
	fi
}

# e2e_pcap_count FILE FILTER...: prints how many packets in FILE match the tcpdump FILTER.
e2e_pcap_count() {
	local file=$1
	shift
	"${E2E_PCAP_READER[@]}" -nn -r - "$@" <"$file" 2>/dev/null | wc -l | tr -d ' '
}

# e2e_assert_marker_absent FILE MARKER WHAT: MARKER must not occur anywhere in the capture.
e2e_assert_marker_absent() {
	local file=$1 marker=$2 what=$3 n
	n=$(grep -a -F -c -- "$marker" "$file" || true)
	if [ "$n" -ne 0 ]; then
		e2e_fail "$what: the marker $marker appears in plaintext ($n lines of $file)"
	fi
	e2e_pass "$what: marker not in plaintext ($(wc -c <"$file") bytes captured)"
}

# e2e_assert_marker_present FILE MARKER WHAT: the positive control (the capture can see it).
e2e_assert_marker_present() {
	local file=$1 marker=$2 what=$3
	if ! grep -a -F -q -- "$marker" "$file"; then
		e2e_fail "$what: the marker $marker was not captured, so the capture proves nothing"
	fi
	e2e_pass "$what: marker seen in plaintext where it should be"
}

# e2e_send_marker FROM_POD TO_POD TO_IP MARKER [PORT] [TIMES]: sends MARKER TIMES times over one
# TCP connection (busybox nc) and checks that TO_POD received it.
e2e_send_marker() {
	local from=$1 to=$2 ip=$3 marker=$4 port=${5:-7777} times=${6:-50} got
	# The listener's stdin must stay open: busybox nc ends the connection at EOF on stdin, after
	# the first line (found by the real-node tier).
	# (Nothing of it may hold the exec's output open, or kubectl exec waits for it.)
	e2e_exec "$to" sh -c "rm -f /tmp/e2e-got; sleep 120 </dev/null 2>/dev/null | nc -l -p $port >/tmp/e2e-got 2>&1 &"
	sleep 1
	# The marker goes in on stdin, so it is not on any command line.
	printf '%s\n' "$marker" | e2e_k -n "$E2E_POD_NS" exec -i "$from" -- sh -c \
		"read -r m; i=0; while [ \$i -lt $times ]; do echo \"\$m\"; i=\$((i + 1)); sleep 0.05; done | nc -w 3 $ip $port" ||
		e2e_fail "sending the marker from $from to $ip:$port"
	sleep 1
	got=$(e2e_exec "$to" sh -c 'grep -c . /tmp/e2e-got || true')
	if [ "${got:-0}" -lt "$times" ]; then
		e2e_fail "$to received $got of $times marker lines"
	fi
	e2e_pass "$from -> $to: $times marker lines over TCP"
}

# e2e_ping_start POD IP [INTERVAL]: a ping that runs until e2e_ping_stop.
e2e_ping_start() {
	local pod=$1 ip=$2 interval=${3:-0.2}
	e2e_exec "$pod" sh -c "ping -i $interval $ip </dev/null >/tmp/e2e-ping.log 2>&1 & echo \$! >/tmp/e2e-ping.pid"
}

# e2e_ping_stop POD LOGFILE: stops the ping and copies its output to LOGFILE.
e2e_ping_stop() {
	local pod=$1 log=$2
	# shellcheck disable=SC2016 # expanded by the pod's shell
	e2e_exec "$pod" sh -c 'kill -INT "$(cat /tmp/e2e-ping.pid)"; sleep 1; cat /tmp/e2e-ping.log' >"$log" ||
		e2e_fail "stopping the ping in $pod"
}

# e2e_assert_no_ping_loss LOGFILE MIN_REPLIES WHAT: every echo request up to the last answered one
# was answered (only the one in flight when the ping was stopped may be missing), and at least
# MIN_REPLIES were. Understands busybox (seq=0...) and iputils (icmp_seq=1...) output.
e2e_assert_no_ping_loss() {
	local log=$1 min=$2 what=$3 result
	result=$(awk '
		/bytes from/ && /seq=/ && !/DUP!/ {
			if (match($0, /icmp_seq=[0-9]+/)) { first = 1; s = substr($0, RSTART + 9, RLENGTH - 9) }
			else if (match($0, /seq=[0-9]+/)) { s = substr($0, RSTART + 4, RLENGTH - 4) }
			else next
			s += 0; seen[s] = 1; n++; if (s > max) max = s
		}
		END {
			if (n == 0) { print "replies=0 missing=0"; exit }
			missing = 0; list = ""
			for (i = first + 0; i <= max; i++) if (!(i in seen)) { missing++; if (missing <= 20) list = list " " i }
			printf "replies=%d last=%d missing=%d%s\n", n, max, missing, (missing ? " seqs:" list : "")
		}' "$log")
	e2e_log "$what: $result"
	case $result in
	*" missing=0"*) ;;
	*)
		tail -20 "$log" >&2
		e2e_fail "$what: pings lost ($result)"
		;;
	esac
	local replies=${result#replies=}
	replies=${replies%% *}
	if [ "$replies" -lt "$min" ]; then
		tail -20 "$log" >&2
		e2e_fail "$what: only $replies replies (want at least $min): the ping did not run throughout"
	fi
	e2e_pass "$what: $replies pings, none lost"
}

# e2e_meshnode_generations: "NAME KEYGENERATION" per MeshNode, sorted.
e2e_meshnode_generations() {
	e2e_k get meshnodes -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.keyGeneration}{"\n"}{end}' | sort
}

# e2e_assert_generations_increased BEFORE AFTER: files from e2e_meshnode_generations; every node
# in BEFORE has a higher key generation in AFTER.
e2e_assert_generations_increased() {
	local before=$1 after=$2 name gen now
	while read -r name gen; do
		now=$(awk -v n="$name" '$1 == n { print $2 }' "$after")
		if [ -z "$now" ] || [ "$now" -le "${gen:-0}" ]; then
			e2e_fail "MeshNode $name: key generation ${gen:-?} -> ${now:-gone}, not rotated"
		fi
		e2e_log "MeshNode $name: key generation $gen -> $now"
	done <"$before"
	e2e_pass "every node rotated its key"
}

# e2e_token_kubeconfig TOKEN OUTFILE: a kubeconfig for the current cluster that authenticates with
# TOKEN only (no client certificate, which the API server would prefer over the token).
e2e_token_kubeconfig() {
	local token=$1 out=$2 server ca
	server=$(e2e_k config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
	ca=$(e2e_k config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
	if [ -z "$ca" ]; then
		local ca_file
		ca_file=$(e2e_k config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority}')
		[ -n "$ca_file" ] || e2e_fail "the kubeconfig names no CA for the API server"
		ca=$(base64 -w0 <"$ca_file")
	fi
	(
		umask 077
		cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: e2e
    cluster:
      server: $server
      certificate-authority-data: $ca
users:
  - name: e2e
    user:
      token: $token
contexts:
  - name: e2e
    context:
      cluster: e2e
      user: e2e
current-context: e2e
EOF
	)
}

# e2e_expect_refused KUBECONFIG WANT_SUBSTRING WHAT -- KUBECTL_ARGS...
e2e_expect_refused() {
	local kc=$1 want=$2 what=$3 out
	shift 3
	[ "${1:-}" = "--" ] && shift
	if out=$(KUBECONFIG=$kc "$KUBECTL" "$@" 2>&1); then
		printf '%s\n' "$out" >&2
		e2e_fail "$what: allowed, should be refused"
	fi
	case $out in
	*"$want"*) ;;
	*)
		printf '%s\n' "$out" >&2
		e2e_fail "$what: refused, but without \"$want\""
		;;
	esac
	e2e_pass "$what: refused ($(printf '%s' "$out" | tr '\n' ' ' | sed 's/.*denied request: //' | cut -c1-240))"
}

# e2e_expect_allowed KUBECONFIG WHAT -- KUBECTL_ARGS...
e2e_expect_allowed() {
	local kc=$1 what=$2 out
	shift 2
	[ "${1:-}" = "--" ] && shift
	if ! out=$(KUBECONFIG=$kc "$KUBECTL" "$@" 2>&1); then
		printf '%s\n' "$out" >&2
		e2e_fail "$what: refused, should be allowed"
	fi
	e2e_pass "$what: allowed"
}

# e2e_check_admission POD_A NODE_A NODE_B TMPDIR: with a token bound to POD_A (a pod of the
# meshd ServiceAccount on NODE_A), meshd may write NODE_A's objects and not NODE_B's, nor the
# admin-only kinds; with a token bound to no pod it may write nothing. Every write is a
# server-side dry run (admission runs, nothing is stored). MeshNodes NODE_A and NODE_B must exist.
e2e_check_admission() {
	local pod_a=$1 node_a=$2 node_b=$3 dir=$4 token kc_a kc_none who claim_b claim_a
	local patch='{"metadata":{"annotations":{"weft.dev/e2e-admission":"x"}}}'
	kc_a=$dir/kubeconfig-meshd-$node_a
	kc_none=$dir/kubeconfig-meshd-unbound
	token=$(e2e_k -n "$E2E_WEFT_NS" create token meshd --bound-object-kind=Pod \
		--bound-object-name="$pod_a" --duration=10m) || e2e_fail "TokenRequest bound to $pod_a"
	e2e_token_kubeconfig "$token" "$kc_a"
	token=$(e2e_k -n "$E2E_WEFT_NS" create token meshd --duration=10m) || e2e_fail "TokenRequest"
	e2e_token_kubeconfig "$token" "$kc_none"

	who=$(KUBECONFIG=$kc_a "$KUBECTL" auth whoami \
		-o jsonpath='{.status.userInfo.username} {.status.userInfo.extra.authentication\.kubernetes\.io/node-name[0]}') ||
		e2e_fail "kubectl auth whoami with the pod-bound token"
	[ "$who" = "system:serviceaccount:$E2E_WEFT_NS:meshd $node_a" ] ||
		e2e_fail "the pod-bound token is \"$who\", want the meshd ServiceAccount on $node_a"
	e2e_pass "pod-bound token: $who"

	e2e_expect_allowed "$kc_a" "meshd@$node_a patches MeshNode $node_a" -- \
		patch meshnode "$node_a" --type=merge -p "$patch" --dry-run=server
	e2e_expect_allowed "$kc_a" "meshd@$node_a patches MeshNode $node_a status" -- \
		patch meshnode "$node_a" --subresource=status --type=merge -p "$patch" --dry-run=server
	e2e_expect_refused "$kc_a" "may not UPDATE meshnodes $node_b" "meshd@$node_a patches MeshNode $node_b" -- \
		patch meshnode "$node_b" --type=merge -p "$patch" --dry-run=server
	e2e_expect_refused "$kc_a" "may not UPDATE meshnodes/status $node_b" \
		"meshd@$node_a patches MeshNode $node_b status" -- \
		patch meshnode "$node_b" --subresource=status --type=merge -p "$patch" --dry-run=server
	e2e_expect_refused "$kc_a" "may not DELETE meshnodes $node_b" "meshd@$node_a deletes MeshNode $node_b" -- \
		delete meshnode "$node_b" --dry-run=server
	e2e_expect_refused "$kc_a" "may not CREATE meshnodehealths $node_b" \
		"meshd@$node_a creates MeshNodeHealth $node_b" -- \
		create --dry-run=server -f - <<EOF
apiVersion: weft.dev/v1alpha1
kind: MeshNodeHealth
metadata:
  name: $node_b
spec:
  reportedAt: 1
  intervalSecs: 30
  links: []
EOF

	claim_b=$(e2e_k get meshpodcidrclaims -o jsonpath="{range .items[?(@.spec.node==\"$node_b\")]}{.metadata.name}{\"\n\"}{end}" | head -1)
	claim_a=$(e2e_k get meshpodcidrclaims -o jsonpath="{range .items[?(@.spec.node==\"$node_a\")]}{.metadata.name}{\"\n\"}{end}" | head -1)
	# meshd updates claims (PUT) and may not patch them.
	if [ -n "$claim_a" ]; then
		e2e_k get meshpodcidrclaim "$claim_a" -o yaml >"$dir/claim-a.yaml"
		e2e_expect_allowed "$kc_a" "meshd@$node_a updates its claim $claim_a" -- \
			replace --dry-run=server -f "$dir/claim-a.yaml"
	fi
	if [ -n "$claim_b" ]; then
		e2e_k get meshpodcidrclaim "$claim_b" -o yaml >"$dir/claim-b.yaml"
		e2e_expect_refused "$kc_a" "with spec.node $node_b" "meshd@$node_a updates $node_b's claim $claim_b" -- \
			replace --dry-run=server -f "$dir/claim-b.yaml"
		e2e_expect_refused "$kc_a" "held by $node_b" "meshd@$node_a deletes $node_b's claim $claim_b" -- \
			delete meshpodcidrclaim "$claim_b" --dry-run=server
	else
		e2e_log "no claim held by $node_b (pod CIDRs from Node.spec.podCIDRs?): claim checks skipped"
	fi

	# Admin-only kinds: RBAC refuses them before admission does.
	e2e_expect_refused "$kc_a" "forbidden" "meshd@$node_a creates a MeshRevocation" -- \
		create --dry-run=server -f - <<EOF
apiVersion: weft.dev/v1alpha1
kind: MeshRevocation
metadata:
  name: $node_b
spec:
  revokedKeys: ["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]
EOF
	e2e_expect_refused "$kc_a" "forbidden" "meshd@$node_a reads Secrets" -- \
		-n "$E2E_WEFT_NS" get secrets

	e2e_expect_refused "$kc_none" "names no node" "meshd token bound to no pod patches MeshNode $node_a" -- \
		patch meshnode "$node_a" --type=merge -p "$patch" --dry-run=server
}
