#!/usr/bin/env bash
# Make the local base image of deploy/Containerfile (localhost/debian:bookworm-min) where no container registry
# is reachable: a debootstrapped minimal Debian bookworm, from the same Debian mirror apt uses, imported into
# podman. Installs podman, runc and debootstrap with apt when they are missing (needs root).
#
#   deploy/base-image.sh [IMAGE]        # IMAGE defaults to localhost/debian:bookworm-min
#
# Skips the debootstrap when the image exists. DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR=url override the mirrors
# read from apt's sources.
set -euo pipefail

IMAGE=${1:-localhost/debian:bookworm-min}
SUITE=bookworm
CONF=/etc/containers/containers.conf
# crun cannot set up cgroups on these machines; runc can.
PODMAN=(podman --runtime runc)

die() { echo "base-image.sh: $*" >&2; exit 1; }

install_tools() {
  local missing=()
  for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" -eq 0 ] || die "${missing[*]} missing and not root: install them (apt-get install ${missing[*]}) or run as root"
  echo "base-image.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Podman's default nofile/nproc ulimits cannot be set inside this sandbox, so containers get none of their own.
# TOML forbids a second [containers] table: add the key under an existing one, or append the table.
configure_ulimits() {
  [ "$(id -u)" -eq 0 ] || return 0
  mkdir -p "$(dirname "$CONF")"
  touch "$CONF"
  grep -qE '^[[:space:]]*default_ulimits[[:space:]]*=' "$CONF" && return
  if grep -qE '^[[:space:]]*\[containers\][[:space:]]*$' "$CONF"; then
    sed -i -E '0,/^[[:space:]]*\[containers\][[:space:]]*$/s//[containers]\ndefault_ulimits = []/' "$CONF"
  else
    printf '\n[containers]\ndefault_ulimits = []\n' >>"$CONF"
  fi
}

# The first URI apt uses for SUITE whose URI matches (or, with "!", does not match) KIND: deb822 *.sources
# first, then one-line lists; DEFAULT when apt names none.
apt_uri() {
  local suite=$1 kind=$2 default=$3 uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v suite="$suite" -v kind="$kind" '
    function want(x) { return kind ~ /^!/ ? x !~ substr(kind, 2) : x ~ kind }
    function done() { if (u != "" && s ~ "(^| )" suite "( |$)") { print u; exit } u = ""; s = "" }
    /^[[:space:]]*$/ { done(); next }
    /^URIs:/ { for (i = 2; i <= NF; i++) if (want($i)) { u = $i; break } }
    /^Suites:/ { $1 = ""; s = $0; sub(/^ /, "", s) }
    END { done() }' | head -n1)
  if [ -z "$uri" ]; then
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v suite="$suite" -v kind="$kind" '
      function want(x) { return kind ~ /^!/ ? x !~ substr(kind, 2) : x ~ kind }
      $1 != "deb" { next }
      { i = 2; if ($2 ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ } }  # skip [options]
      $(i + 1) == suite && want($i) { print $i; exit }')
  fi
  echo "${uri:-$default}"
}

install_tools
configure_ulimits
if "${PODMAN[@]}" image exists "$IMAGE"; then
  echo "base-image.sh: $IMAGE exists" >&2
  exit 0
fi
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
ROOTFS=$(mktemp -d /var/tmp/base-image.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
MIRROR=${DEBIAN_MIRROR:-$(apt_uri "$SUITE" '!security' http://deb.debian.org/debian)}
SECURITY=${DEBIAN_SECURITY_MIRROR:-$(apt_uri "$SUITE-security" security http://deb.debian.org/debian-security)}
echo "base-image.sh: debootstrap --variant=minbase $SUITE from $MIRROR" >&2
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >/dev/null
# debootstrap lists only the release; the image's `apt-get install` should get point and security updates too.
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
EOF
# apt's package cache and lists are rebuilt by `apt-get update` in the Containerfile; don't ship them.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log
tar -C "$ROOTFS" -c . | "${PODMAN[@]}" import -q --change 'CMD ["bash"]' - "$IMAGE" >/dev/null
echo "base-image.sh: made $IMAGE" >&2
