#!/usr/bin/env bash
# Sets up podman, its Docker-compatible API socket and the images the podman driver's tests use,
# on a Debian 12 machine of the project's kind (run as root). Idempotent: a second run on the same
# machine changes nothing and takes a few seconds. Every trap cited below ("backends.md") is
# described in docs/backends.md, intro and section "Podman (and its Docker-compatible API)".
#
# Result:
#   - /run/podman/podman.sock answers the Docker API (podman system service, left running);
#   - the test images of tests/setup/images.sh, built from Debian packages (no registry is
#     reachable), their rootfs tarballs cached in /var/cache/drover/images/, so a rerun after
#     `podman rmi` imports instead of running debootstrap again;
#   - /var/cache/drover/busybox, the static busybox alone (drover-core tests its stage agent
#     under busybox's sh with it).
#
# Environment: DROVER_DEBIAN_MIRROR (default: debootstrap's own default mirror).
set -euo pipefail

SOCK_PATH=/run/podman/podman.sock
SOCK_URL=unix://$SOCK_PATH
SERVICE_LOG=/var/log/drover-podman-service.log
SETUP_NAME="podman setup"
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=tests/setup/images.sh
. "$(dirname "${BASH_SOURCE[0]}")/images.sh"

require_root_debian "installs packages, runs the rootful podman service"

# Work directory for rootfs builds, on the cache's file system. Removed on exit however we exit.
# --one-file-system: if a killed debootstrap ever left proc/sys mounted inside a rootfs, rm must
# not descend into the host's /proc or /sys.
mkdir -p "$CACHE"
work=
cleanup() { [ -z "$work" ] || rm -rf --one-file-system "$work"; }
trap cleanup EXIT

# Two runs at once (CI plus a developer) would race on the cache and on starting the service
# (backends.md rerun trap): serialise them, with a bounded wait.
exec 9>/var/cache/drover/podman-setup.lock
flock -w 900 9 || die "another tests/setup/podman.sh has held /var/cache/drover/podman-setup.lock for 15 min"

# ---------------------------------------------------------------------------------------------
# 1. Packages. `runc` by name: podman depends on `crun | runc` and crun refuses this machine's
#    cgroups v1 hybrid mode (backends.md). debootstrap builds the images (no registry reachable),
#    curl probes the API socket. With recommends, as backends.md installed and tested it
#    (netavark, catatonit, uidmap...).
ensure_packages podman runc debootstrap curl tar

# ---------------------------------------------------------------------------------------------
# 2. /etc/containers/containers.conf, exactly as backends.md says works: podman's default rlimits
#    (nofile 1048576) exceed the hard limits here (nofile 20000, nproc 96365; root lacks
#    CAP_SYS_RESOURCE), so every start failed with "error setting rlimit type 7". Set both nofile
#    and nproc (setting one drops the default of the other). cgroupfs because there is no systemd;
#    runc because crun cannot use cgroups v1 hybrid mode.
conf=/etc/containers/containers.conf
want_conf='# Written by drover tests/setup/podman.sh; see docs/backends.md in drover (Podman section).
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"'
conf_changed=false
if [ "$(cat "$conf" 2>/dev/null)" != "$want_conf" ]; then
    mkdir -p /etc/containers
    [ ! -e "$conf" ] || cp -p "$conf" "$conf.drover-backup"
    printf '%s\n' "$want_conf" >"$conf.tmp" && mv "$conf.tmp" "$conf"
    conf_changed=true
    say "wrote $conf"
else
    say "$conf already as wanted"
fi

# ---------------------------------------------------------------------------------------------
# 3. The Docker-compatible API service. No systemd here (PID 1 is not systemd; apt starts no
#    service), so we start it ourselves. Rerun trap (backends.md): a second `podman system service`
#    on the same path silently replaces the socket and, when either exits, the socket is removed,
#    leaving the other deaf. So start one only if the socket does not answer. A stale socket file
#    from a killed service is harmless (the new service replaces it).
ping() { curl -sf --max-time 2 --unix-socket "$SOCK_PATH" http://d/_ping >/dev/null 2>&1; }
# A service started (by an older version of this script) from a checkout that was removed since
# answers pings but cannot start a container: stop it, and start one from / below.
for pid in $(pgrep -f "podman system service" || true); do
    case $(readlink "/proc/$pid/cwd" 2>/dev/null) in
    *" (deleted)")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        echo "podman setup: stopped podman system service pid $pid (its working directory was removed)"
        ;;
    esac
done
if ping; then
    if $conf_changed; then
        echo "podman setup: WARNING: $conf changed but a podman service was already running on" \
             "$SOCK_PATH; it keeps its old settings until it is stopped and this script rerun" >&2
    fi
    started="already running"
else
    # /run is a plain directory here, not a tmpfs, and has no /run/podman: without it the bind
    # fails with "no such file or directory".
    mkdir -p /run/podman
    # Detached (common.sh says why each part matters). --time=0: never idle out.
    start_detached "$SERVICE_LOG" podman system service --time=0 "$SOCK_URL"
    service_pid=$detached_pid
    # It answers within 0.3 s here (backends.md); allow 10 s (50 x 0.2 s).
    for _ in $(seq 50); do
        ping && break
        kill -0 "$service_pid" 2>/dev/null || die "podman system service exited at once; see $SERVICE_LOG"
        sleep 0.2
    done
    ping || die "podman system service (pid $service_pid) did not answer on $SOCK_PATH within 10 s; see $SERVICE_LOG"
    started="started, pid $service_pid, log $SERVICE_LOG"
fi
# The version from _ping's Libpod-Api-Version header: GET /version costs 0.76 s here (podman
# gathers host info for it), _ping 0.01 s.
version=$(curl -sfI --max-time 2 --unix-socket "$SOCK_PATH" http://d/_ping \
    | tr -d '\r' | sed -n 's/^Libpod-Api-Version: *//Ip' | head -n1)
say "podman ${version:-?} ready on $SOCK_PATH ($started)"

# ---------------------------------------------------------------------------------------------
# 4. Images. No image registry is reachable (backends.md): build root file systems from Debian
#    packages, cache them as tarballs, import with `podman import`. Everything is skipped when the
#    image exists; the tarball cache saves the ~55 s debootstrap after a `podman rmi`.
work=$(mktemp -d "$CACHE/.build.XXXXXX")

ensure_images podman

# The static busybox on its own, for drover-core's tests of the stage agent under busybox's sh.
if [ ! -x /var/cache/drover/busybox ]; then
    build_busybox_tar
    tar -xOf "$BUSYBOX_TAR" ./bin/busybox >/var/cache/drover/busybox.tmp \
        && chmod 0755 /var/cache/drover/busybox.tmp && mv /var/cache/drover/busybox.tmp /var/cache/drover/busybox \
        || die "cannot unpack busybox from $BUSYBOX_TAR"
    say "busybox for the agent's tests at /var/cache/drover/busybox"
fi

step_start=$t0
say "done"
