#!/usr/bin/env bash
# Builds weft's image without a Docker daemon or a registry, from binaries built on this machine:
#
#   deploy/image/build-image.sh BIN_DIR IMAGE OUTPUT.tar
#   deploy/image/build-image.sh target/debug localhost/weft:dev /tmp/weft.tar
#
# BIN_DIR holds meshd, weft-cni and keyctl (e.g. target/debug or target/release). The image is
# the layout of deploy/image/Dockerfile: FROM scratch, the three binaries in /usr/local/bin,
# ENTRYPOINT meshd, plus exactly the shared libraries `ldd` lists for them and the dynamic
# loader, copied from this machine (no base image: no registry is needed). It is committed to
# buildah's local storage as IMAGE and written as an OCI archive that containerd imports:
#
#   ctr -n k8s.io images import OUTPUT.tar
#
# Use a fully qualified IMAGE (localhost/weft:dev, registry.example.com/weft:1.0): containerd and
# the kubelet refer to images by full name. Needs root and buildah (Debian: apt-get install
# buildah). STORAGE_DRIVER (e.g. vfs) is passed through to buildah if set.
#
# weft-cni runs on the host, not in this image: `meshd install-cni` copies it into the host's
# CNI bin dir. A dynamically linked weft-cni then needs the host's libraries to match this
# machine's; the script warns when it is not static (the Dockerfile builds it static).
set -euo pipefail

usage() {
	echo "usage: $0 BIN_DIR IMAGE OUTPUT.tar   (e.g. $0 target/debug localhost/weft:dev /tmp/weft.tar)" >&2
	exit 64
}

die() {
	echo "build-image: $*" >&2
	exit 1
}

[ "$#" -eq 3 ] || usage
bin_dir=$1
image=$2
out=$3

[ "$(id -u)" -eq 0 ] || die "run as root (buildah needs it here)"
command -v buildah >/dev/null || die "buildah not found (Debian: apt-get install -y buildah)"
command -v ldd >/dev/null || die "ldd not found (Debian: libc-bin)"
case $out in
*:*) die "OUTPUT path may not contain ':' (buildah's oci-archive:PATH:IMAGE syntax)" ;;
esac
case $image in
*/*:*) ;;
*) die "IMAGE must be NAME/REPO:TAG, e.g. localhost/weft:dev (got '$image')" ;;
esac

bins=(meshd weft-cni keyctl)
for b in "${bins[@]}"; do
	if [ ! -f "$bin_dir/$b" ] || [ ! -x "$bin_dir/$b" ]; then
		die "$bin_dir/$b: not an executable file"
	fi
done

root=$(mktemp -d)
ctr=""
cleanup() {
	if [ -n "$ctr" ]; then
		buildah rm "$ctr" >/dev/null 2>&1 || echo "build-image: could not remove working container $ctr" >&2
	fi
	rm -rf "$root"
}
trap cleanup EXIT

# The root filesystem: binaries, then every library (and the loader) at the path ldd names,
# each as a regular file with the content its symlinks lead to.
install -d -m 0755 "$root/usr/local/bin"
for b in "${bins[@]}"; do
	install -m 0755 "$bin_dir/$b" "$root/usr/local/bin/$b"
done

libs=()
for b in "${bins[@]}"; do
	if ! deps=$(ldd "$bin_dir/$b" 2>&1); then
		# ldd exits 1 for a static binary ("not a dynamic executable").
		case $deps in
		*"not a dynamic executable"* | *"statically linked"*) deps="" ;;
		*) die "ldd $bin_dir/$b: $deps" ;;
		esac
	fi
	case $deps in
	*"not found"*) die "ldd $bin_dir/$b: a library is missing: $deps" ;;
	esac
	if [ "$b" = weft-cni ] && [ -n "$deps" ]; then
		echo "build-image: warning: weft-cni is dynamically linked; it runs on the host, which" \
			"needs these libraries (glibc $(ldd --version | sed -n '1s/.* //p') or newer)." \
			"Build it static for other hosts: RUSTFLAGS='-C target-feature=+crt-static'" \
			"cargo build -p weft-cni --target \$(rustc -vV | sed -n 's/^host: //p')" >&2
	fi
	# Lines look like "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
	# "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no path.
	while read -r path; do
		[ -n "$path" ] && libs+=("$path")
	done < <(printf '%s\n' "$deps" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }')
done

if [ "${#libs[@]}" -gt 0 ]; then
	while read -r lib; do
		real=$(readlink -f "$lib")
		[ -f "$real" ] || die "$lib (from ldd) is not a file"
		install -D -m 0755 "$real" "$root$lib"
		echo "build-image: + $lib" >&2
	done < <(printf '%s\n' "${libs[@]}" | sort -u)
fi

ctr=$(buildah from --pull=false scratch)
buildah copy --quiet "$ctr" "$root" / >/dev/null
buildah config \
	--entrypoint '["/usr/local/bin/meshd"]' \
	--cmd '' \
	--env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	--workingdir / \
	--user 0:0 \
	--label org.opencontainers.image.title=weft \
	--label org.opencontainers.image.description="weft: encrypted WireGuard mesh for Kubernetes (meshd, weft-cni, keyctl)" \
	"$ctr"
commit_args=(--quiet --format oci --rm)
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
	commit_args+=(--timestamp "$SOURCE_DATE_EPOCH")
fi
buildah commit "${commit_args[@]}" "$ctr" "$image" >/dev/null
ctr="" # --rm removed the working container

mkdir -p "$(dirname "$out")"
rm -f "$out"
buildah push --quiet "$image" "oci-archive:$out:$image"
echo "build-image: $image -> $out ($(du -h "$out" | cut -f1))" >&2
echo "build-image: import with: ctr -n k8s.io images import $out" >&2
