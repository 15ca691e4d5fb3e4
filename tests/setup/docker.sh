#!/usr/bin/env bash
# Sets up Docker Engine from Debian's packages and the images the podman driver's tests use, so
# that drover-podman's integration tests and `drover conformance` also run against Docker (run as
# root). Idempotent: a second run on the same machine changes nothing and takes a second or two.
#
# Result:
#   - /var/run/docker.sock (Docker's default socket) answers: dockerd, started by hand and left
#     running (no systemd here, docs/backends.md), with --bridge=none and --iptables=false: Docker
#     makes no bridge in a private range and touches no firewall, and containers run with `none`
#     or `host` networking, as the tests ask;
#   - the test images of tests/setup/images.sh, imported from the tarballs podman.sh caches (or
#     built here when there are none).
#
# Environment: DROVER_DEBIAN_MIRROR (default: debootstrap's own default mirror).
set -euo pipefail

SOCK_PATH=/var/run/docker.sock
DAEMON_LOG=/var/log/drover-dockerd.log
SETUP_NAME="docker setup"
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=tests/setup/images.sh
. "$(dirname "${BASH_SOURCE[0]}")/images.sh"

require_root_debian "installs packages, runs dockerd"

mkdir -p "$CACHE"
work=
cleanup() { [ -z "$work" ] || rm -rf --one-file-system "$work"; }
trap cleanup EXIT

# Two runs at once would both start a daemon on the same socket: serialise them, bounded.
exec 9>/var/cache/drover/docker-setup.lock
flock -w 900 9 || die "another tests/setup/docker.sh has held /var/cache/drover/docker-setup.lock for 15 min"

# ---------------------------------------------------------------------------------------------
# 1. Packages: Debian's Docker Engine (docker.io: dockerd, containerd, the docker CLI) and runc
#    by name, as for podman (crun refuses these cgroups). debootstrap only for building images
#    when podman.sh has not cached them.
ensure_packages docker.io runc debootstrap curl tar

# ---------------------------------------------------------------------------------------------
# 2. The daemon. apt cannot start it without systemd, so we do, only when the socket does not
#    answer (a second daemon on the same socket would fight the first for it). dockerd starts
#    its own containerd.
ping() { curl -sf --max-time 2 --unix-socket "$SOCK_PATH" http://d/_ping >/dev/null 2>&1; }
if ping; then
    started="already running"
else
    start_detached "$DAEMON_LOG" dockerd --host "unix://$SOCK_PATH" --bridge=none \
        --iptables=false --ip6tables=false
    daemon_pid=$detached_pid
    # It answers within about 1 s here; allow 30 s (150 x 0.2 s).
    for _ in $(seq 150); do
        ping && break
        kill -0 "$daemon_pid" 2>/dev/null || die "dockerd exited at once; see $DAEMON_LOG"
        sleep 0.2
    done
    ping || die "dockerd (pid $daemon_pid) did not answer on $SOCK_PATH within 30 s; see $DAEMON_LOG"
    started="started, pid $daemon_pid, log $DAEMON_LOG"
fi
version=$(curl -sf --max-time 5 --unix-socket "$SOCK_PATH" http://d/version \
    | sed -n 's/.*"Version":"\([^"]*\)".*"ApiVersion".*/\1/p' | head -n1)
say "Docker ${version:-?} ready on $SOCK_PATH ($started)"

# ---------------------------------------------------------------------------------------------
# 3. Images, with the docker CLI of whichever package put one first on PATH (it negotiates the
#    API version with the daemon).
export DOCKER_HOST=unix://$SOCK_PATH
work=$(mktemp -d "$CACHE/.build.XXXXXX")
ensure_images docker

step_start=$t0
say "done"
