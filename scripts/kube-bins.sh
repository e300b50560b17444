#!/usr/bin/env bash
# Builds the real Kubernetes binaries the kube test tiers run (control plane, kubectl, and the
# kubelet of the real-node tier), from the Go module proxy, once per version, into a cache
# outside the repository:
#   scripts/kube-bins.sh            # prints the bin directory (builds what is missing)
# Env: WEFT_KUBE_VERSION (default v1.37.2), WEFT_KUBE_CACHE (default /var/cache/weft/kubernetes).
# How: a wrapper module requires k8s.io/kubernetes at that release and replaces every k8s.io/*
# staging module (the `=> ./staging/...` lines of k8s.io/kubernetes's own go.mod) with its v0.x
# twin, then `go build`s each command with the version ldflags, so clients see a real version.
# A binary that exists in the cache is not built again; a build goes to a temporary name first,
# so an interrupted build never leaves a half-written binary behind.
set -euo pipefail
version=${WEFT_KUBE_VERSION:-v1.37.2}
cache=${WEFT_KUBE_CACHE:-/var/cache/weft/kubernetes}/$version
bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)
mkdir -p "$cache/bin"
missing=()
for b in "${bins[@]}"; do [ -x "$cache/bin/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then echo "$cache/bin"; exit 0; fi

minor=${version#v1.}; minor=${minor%%.*}
staging_version="v0.${version#v1.}"
mod="$cache/wrapper"
mkdir -p "$mod"
cd "$mod"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
tools=$(
    echo '//go:build tools'
    echo
    echo 'package tools'
    echo
    echo 'import ('
    for b in "${bins[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$b\""; done
    echo ')'
)
# A new command in the list needs its packages in go.sum: tidy again when tools.go changes.
if [ ! -f go.sum ] || [ ! -f .tidy-done ] || [ "$(cat tools.go 2>/dev/null)" != "$tools" ]; then
    gomod=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
    [ -f "$gomod" ] || { echo "kube-bins: no go.mod for k8s.io/kubernetes@$version" >&2; exit 1; }
    {
        echo "module weft.dev/kube-bins"
        echo
        grep -E '^go [0-9]' "$gomod"
        echo
        echo "require k8s.io/kubernetes $version"
        echo
        grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" |
            awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
    } > go.mod
    echo "$tools" > tools.go
    echo "kube-bins: go mod tidy for k8s.io/kubernetes $version ($(grep -c '^replace' go.mod) staging modules)" >&2
    go mod tidy -e >&2
    touch .tidy-done
fi
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
for b in "${missing[@]}"; do
    t0=$(date +%s)
    echo "kube-bins: building $b $version (first build of kube-apiserver takes ~15 min on 2 cores)" >&2
    go build -tags tools -trimpath -ldflags "$ldflags" -o "$cache/bin/.$b.tmp" "k8s.io/kubernetes/cmd/$b" >&2
    mv "$cache/bin/.$b.tmp" "$cache/bin/$b"
    echo "kube-bins: built $b in $(( $(date +%s) - t0 ))s" >&2
done
echo "$cache/bin"
