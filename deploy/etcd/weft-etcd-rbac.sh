#!/usr/bin/env bash
# weft-etcd-rbac.sh: creates weft's per-node etcd roles and users, and is safe to run again.
# The layout and the reasons for it are in deploy/etcd/README.md.
#
#   weft-etcd-rbac.sh [options] NODE...
#
# For the prefix PREFIX (default /weft) it makes sure that:
#   - the role weft-admin has readwrite on the prefix PREFIX/, and the user weft-admin has it.
#     keyctl and operators use this user. Revocations, external peers (PREFIX/peers/), the PSK
#     generation and everything else under PREFIX that is not a node's own record, claim or
#     health report are written only by it.
#   - for each NODE, the role weft-node-NODE has readwrite on exactly the keys PREFIX/nodes/NODE,
#     PREFIX/claims/NODE and PREFIX/health/NODE and read on the prefix PREFIX/, and the user
#     weft-node-NODE has it.
#     meshd on NODE logs in as this user, with a password (WEFT_ETCD_USERNAME and
#     WEFT_ETCD_PASSWORD) or with a client certificate whose CN is weft-node-NODE (etcd started
#     with --client-cert-auth).
#
# Options:
#   --prefix PREFIX   key prefix, the same as meshd's --etcd-prefix (default /weft)
#   --no-password     create new users without a password: they can log in only with a client
#                     certificate whose CN is the user name
#   --no-admin        do not touch the weft-admin role and user
#   --enable-auth     also create the root user if it is missing, give it the root role and turn
#                     etcd authentication on. Without this option the script expects auth to be
#                     on or to be turned on later.
#   --reset           delete and recreate the roles this script manages, dropping any permission
#                     granted to them by hand. Their users keep them.
#   -h, --help        show this help
#
# Connection and the credentials of a user with the root role come from the usual etcdctl
# variables: ETCDCTL_ENDPOINTS, ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY, and ETCDCTL_USER with
# ETCDCTL_PASSWORD (or ETCDCTL_USER=name:password). A client certificate with CN=root works too
# when etcd runs with --client-cert-auth.
#
# Passwords (only for users that get one; never taken from the command line):
#   WEFT_ETCD_ADMIN_PASSWORD               weft-admin
#   WEFT_ETCD_NODE_PASSWORD_<NODE>         weft-node-NODE; NODE upper-cased with '-' and '.' as
#                                          '_' (node-1 -> WEFT_ETCD_NODE_PASSWORD_NODE_1)
#   WEFT_ETCD_ROOT_PASSWORD                root (only with --enable-auth)
# A new user without a password variable gets a random password. It is printed once, on
# stdout, as one line "USER PASSWORD", and never again. An existing user keeps its password
# unless its variable is set, in which case the password is set to the variable's value.
# Everything else goes to stderr.
#
# Exit codes: 0 done; 1 etcd refused or could not be reached; 2 bad usage (invalid node name,
# unknown option); 3 a managed role holds permissions beyond the layout (run again with
# --reset to drop them).
set -euo pipefail

prog=${0##*/}
prefix=/weft
no_password=false
admin=true
enable_auth=false
reset=false
nodes=()

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}
die() {
    echo "$prog: $*" >&2
    exit 1
}
bad_usage() {
    echo "$prog: $*" >&2
    echo "run $prog --help for usage" >&2
    exit 2
}
log() { echo "$prog: $*" >&2; }

while [ $# -gt 0 ]; do
    case $1 in
    --prefix) [ $# -ge 2 ] || bad_usage "--prefix needs a value"; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#--prefix=}; shift ;;
    --no-password) no_password=true; shift ;;
    --no-admin) admin=false; shift ;;
    --enable-auth) enable_auth=true; shift ;;
    --reset) reset=true; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; nodes+=("$@"); break ;;
    -*) bad_usage "unknown option $1" ;;
    *) nodes+=("$1"); shift ;;
    esac
done

# The same rules as meshd's --etcd-prefix.
case $prefix in
/?*) ;;
*) bad_usage "--prefix $prefix must start with '/', for example /weft" ;;
esac
if [[ $prefix == */ || $prefix == *//* || ! $prefix =~ ^[[:graph:]]+$ || ${#prefix} -gt 200 ]]; then
    bad_usage "--prefix $prefix must not end with '/', contain '//' or spaces, and be at most 200 characters"
fi
# The same rules as node names in weft (weft_core::record::check_name): a lowercase DNS name.
for n in "${nodes[@]}"; do
    if [[ ${#n} -gt 253 || ! $n =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ || $n == *..* ]]; then
        bad_usage "node name '$n' is not a lowercase DNS name (a-z, 0-9, '-', '.'; at most 253 characters; starting and ending with a letter or digit)"
    fi
done
if [ ${#nodes[@]} -eq 0 ] && ! $admin && ! $enable_auth; then
    bad_usage "nothing to do: give node names, or drop --no-admin"
fi

export ETCDCTL_API=3
ETCDCTL_BIN=${ETCDCTL_BIN:-etcdctl}
command -v "$ETCDCTL_BIN" >/dev/null || die "etcdctl not found (set ETCDCTL_BIN or install etcd-client)"

# Runs etcdctl; on failure dies with etcd's error (the last line of its stderr).
ectl() {
    local out
    if ! out=$("$ETCDCTL_BIN" "$@" 2>&1 >/dev/null); then
        die "etcdctl $1 $2 ${3:-} failed: $(printf '%s\n' "$out" | grep -v '^{' | tail -n 1)"
    fi
}
# Runs etcdctl with the password on stdin (never on the command line).
ectl_pw() {
    local pw=$1 out
    shift
    if ! out=$(printf '%s\n' "$pw" | "$ETCDCTL_BIN" "$@" --interactive=false 2>&1 >/dev/null); then
        die "etcdctl $1 $2 ${3:-} failed: $(printf '%s\n' "$out" | grep -v '^{' | tail -n 1)"
    fi
}
# exists role|user NAME: 0 if it exists, 1 if not, dies on any other error.
exists() {
    local out
    if out=$("$ETCDCTL_BIN" "$1" get "$2" 2>&1); then
        return 0
    fi
    case $out in
    *"$1 name not found"*) return 1 ;;
    *) die "etcdctl $1 get $2 failed: $(printf '%s\n' "$out" | grep -v '^{' | tail -n 1)" ;;
    esac
}
gen_password() {
    od -An -tx1 -N16 /dev/urandom | tr -d ' \n'
}

# Who may manage users? (Fails early with a clear message instead of half-way through.)
if ! out=$("$ETCDCTL_BIN" user list 2>&1 >/dev/null); then
    die "cannot list etcd users: $(printf '%s\n' "$out" | grep -v '^{' | tail -n 1)
(connect with ETCDCTL_ENDPOINTS/ETCDCTL_CACERT/ETCDCTL_CERT/ETCDCTL_KEY and the credentials of a user with the root role: ETCDCTL_USER and ETCDCTL_PASSWORD, or a client certificate with CN=root)"
fi

# PREFIX/ as a range: [PREFIX/, PREFIX0), as etcdctl prints a prefix permission.
prefix_line="[$prefix/, ${prefix}0) (prefix $prefix/)"

# ensure_role NAME READ_LINES WRITE_LINES GRANTS...: creates the role (or recreates it with
# --reset), grants each "TYPE KEY [--prefix]" and checks that the role holds nothing else.
ensure_role() {
    local role=$1 want_read=$2 want_write=$3
    shift 3
    if exists role "$role"; then
        if $reset; then
            log "role $role: deleting it to recreate it (--reset)"
            ectl role delete "$role"
            ectl role add "$role"
        fi
    else
        ectl role add "$role"
        log "role $role: created"
    fi
    local g
    for g in "$@"; do
        # shellcheck disable=SC2086 # "TYPE KEY [--prefix]" splits into arguments on purpose
        ectl role grant-permission "$role" $g
    done
    # Anything beyond the layout (granted by hand, or left from another prefix)?
    local got section line extra=()
    got=$("$ETCDCTL_BIN" role get "$role" 2>/dev/null) || die "etcdctl role get $role failed"
    section=
    while IFS= read -r line; do
        case $line in
        "KV Read:") section="read" ;;
        "KV Write:") section="write" ;;
        $'\t'*)
            line=${line#$'\t'}
            if [ "$section" = read ]; then
                grep -qxF -- "$line" <<<"$want_read" || extra+=("read $line")
            else
                grep -qxF -- "$line" <<<"$want_write" || extra+=("write $line")
            fi
            ;;
        esac
    done <<<"$got"
    if [ ${#extra[@]} -gt 0 ]; then
        log "role $role holds permissions beyond weft's layout:"
        printf '    %s\n' "${extra[@]}" >&2
        log "run again with --reset to recreate it with only the layout's permissions"
        exit 3
    fi
    log "role $role: ok"
}

# ensure_user NAME ROLE PASSWORD_VARIABLE
ensure_user() {
    local user=$1 role=$2 var=$3 pw
    pw=${!var:-}
    if exists user "$user"; then
        if [ -n "$pw" ]; then
            ectl_pw "$pw" user passwd "$user"
            log "user $user: password set from $var"
        fi
    elif [ -n "$pw" ]; then
        ectl_pw "$pw" user add "$user"
        log "user $user: created with the password from $var"
    elif $no_password; then
        ectl user add "$user" --no-password
        log "user $user: created without a password (client certificate CN=$user)"
    else
        pw=$(gen_password)
        ectl_pw "$pw" user add "$user"
        log "user $user: created with a generated password (printed on stdout, once)"
        printf '%s %s\n' "$user" "$pw"
    fi
    [ -z "$role" ] || ectl user grant-role "$user" "$role"
    log "user $user: ok"
}

if $admin; then
    ensure_role weft-admin "$prefix_line" "$prefix_line" "readwrite $prefix/ --prefix"
    ensure_user weft-admin weft-admin WEFT_ETCD_ADMIN_PASSWORD
fi

for n in "${nodes[@]}"; do
    own=$(printf '%s\n' "$prefix/claims/$n" "$prefix/health/$n" "$prefix/nodes/$n")
    var=WEFT_ETCD_NODE_PASSWORD_$(printf '%s' "$n" | tr 'a-z.-' 'A-Z__')
    ensure_role "weft-node-$n" "$prefix_line"$'\n'"$own" "$own" \
        "read $prefix/ --prefix" \
        "readwrite $prefix/nodes/$n" \
        "readwrite $prefix/claims/$n" \
        "readwrite $prefix/health/$n"
    ensure_user "weft-node-$n" "weft-node-$n" "$var"
done

if $enable_auth; then
    # root needs the root role; etcd refuses to turn auth on without it.
    ensure_user root root WEFT_ETCD_ROOT_PASSWORD
    ectl auth enable
    log "authentication is on"
fi
