#!/usr/bin/env bash
# System packages for `make demo` / `make test` on Debian 12 (bookworm), as root.
# Idempotent and quick when everything is there. Two tools come from Debian 13 (trixie),
# read through a private apt list kept in $CACHE (the machine's apt sources are not
# touched):
#   - the Compose v2 CLI plugin (Debian 12 has only Compose v1): trixie's docker-compose
#     2.26 depends only on libc6 >= 2.34, installed with dpkg (plugin in
#     /usr/libexec/docker/cli-plugins);
#   - restic 0.18, unpacked beside Debian 12's 0.14 (never replacing it) into
#     $CACHE/restic-0.18/restic, so the suite runs restic-facing tests on both.
set -euo pipefail

CACHE=${LABKEEPER_SYSTEM_CACHE:-/var/cache/labkeeper}
APT_PKGS=(postgresql restic openssh-server python3 python3-venv ca-certificates
          docker.io docker-registry busybox-static mmdebstrap iproute2 prometheus git)
NEED_BINS=(/usr/bin/restic /usr/sbin/sshd /usr/bin/pg_dump /usr/bin/psql /usr/sbin/runuser
           /usr/sbin/dockerd /usr/bin/docker-registry /bin/busybox /usr/bin/mmdebstrap /usr/sbin/ip
           /usr/bin/promtool /usr/bin/git)
RESTIC_NEW_VERSION=0.18.0
COMPOSE_VERSION=2.26.1

say() { echo "install-system: $*"; }
as_root() { [ "$(id -u)" = 0 ] || { echo "install-system: run as root ($*)" >&2; exit 1; }; }

missing=0
for b in "${NEED_BINS[@]}"; do [ -x "$b" ] || missing=1; done
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=1
if [ $missing = 1 ]; then
  as_root "apt-get install"
  say "installing ${APT_PKGS[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Never start the system's docker daemon (bridge, iptables) as a side effect of the install:
  # the lab starts its own engine on a private socket.
  policy=/usr/sbin/policy-rc.d; made_policy=0
  if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod 755 $policy; made_policy=1; fi
  trap '[ $made_policy = 1 ] && rm -f $policy' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${APT_PKGS[@]}" >/dev/null
fi

trixie_download() {  # PACKAGE VERSION -> path of the .deb in $CACHE/debs
  local pkg=$1 ver=$2 deb
  deb=$(ls "$CACHE"/debs/"${pkg}"_"${ver}"-*_amd64.deb 2>/dev/null | head -1 || true)
  if [ -n "$deb" ]; then echo "$deb"; return; fi
  as_root "apt-get download $pkg"
  local lists=$CACHE/trixie-apt
  mkdir -p "$lists/lists/partial" "$lists/cache/archives/partial" "$CACHE/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    > "$lists/sources.list"
  local o=(-o "Dir::Etc::SourceList=$lists/sources.list" -o Dir::Etc::SourceParts=/nonexistent
           -o "Dir::State::Lists=$lists/lists" -o "Dir::Cache=$lists/cache" -o APT::Sandbox::User=root -qq)
  [ -n "$(ls "$lists/lists" 2>/dev/null | grep -v partial || true)" ] || apt-get "${o[@]}" update >&2
  (cd "$CACHE/debs" && apt-get "${o[@]}" download "$pkg=$(apt-cache "${o[@]}" madison "$pkg" \
      | awk -v v="$ver" '$3 ~ "^"v {print $3; exit}')" >&2)
  ls "$CACHE"/debs/"${pkg}"_"${ver}"-*_amd64.deb | head -1
}

if ! docker compose version 2>/dev/null | grep -q "v\?2\."; then
  deb=$(trixie_download docker-compose "$COMPOSE_VERSION")
  say "installing the Compose v2 plugin from $deb"
  dpkg -i "$deb" >/dev/null
fi

if [ ! -x "$CACHE/restic-0.18/restic" ]; then
  deb=$(trixie_download restic "$RESTIC_NEW_VERSION")
  say "unpacking restic $RESTIC_NEW_VERSION into $CACHE/restic-0.18"
  tmp=$(mktemp -d); dpkg-deb -x "$deb" "$tmp"
  mkdir -p "$CACHE/restic-0.18"; install -m 755 "$tmp/usr/bin/restic" "$CACHE/restic-0.18/restic"
  rm -rf "$tmp"
fi
