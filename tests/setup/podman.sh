#!/usr/bin/env bash
# Sets up podman, its Docker-compatible API socket and the images the podman driver's tests use,
# on a Debian 12 machine of the project's kind (run as root). Idempotent: a second run on the same
# machine changes nothing and takes a few seconds. Every trap cited below ("backends.md") is
# described in /work/shared/backends.md, intro and section "Podman (and its Docker-compatible API)".
#
# Result:
#   - /run/podman/podman.sock answers the Docker API (podman system service, left running);
#   - images (no registry is reachable, so all are built here from Debian packages):
#       localhost/drover-test/debian:bookworm   user image: minbase + procps, no git/gitlab-runner
#       localhost/drover-test/helper:bookworm   the same + git, ca-certificates, curl (helper image;
#                                               the driver bind-mounts gitlab-runner into it)
#       localhost/drover-test/busybox:latest    busybox-static only (service containers: nc -l -p)
#   - rootfs tarballs cached in /var/cache/drover/images/, so a rerun after `podman rmi` imports
#     instead of running debootstrap again;
#   - /var/cache/drover/busybox, the static busybox alone (drover-core tests its stage agent
#     under busybox's sh with it).
#
# Environment: DROVER_DEBIAN_MIRROR (default: debootstrap's own default mirror).
set -euo pipefail

SOCK_PATH=/run/podman/podman.sock
SOCK_URL=unix://$SOCK_PATH
SERVICE_LOG=/var/log/drover-podman-service.log
CACHE=/var/cache/drover/images
MIRROR=${DROVER_DEBIAN_MIRROR:-}
SUITE=bookworm
USER_IMAGE=localhost/drover-test/debian:bookworm
HELPER_IMAGE=localhost/drover-test/helper:bookworm
BUSYBOX_IMAGE=localhost/drover-test/busybox:latest
# Packages on top of debootstrap's minbase (which already has bash, coreutils, util-linux for
# setsid, findutils, tar). procps gives ps/kill to the tests.
USER_INCLUDE=procps
HELPER_EXTRA=(git ca-certificates curl tar)
# Cache file names carry the recipe, so changing the package lists above builds new tarballs
# instead of silently importing stale ones.
USER_TAR=$CACHE/debian-$SUITE-minbase-${USER_INCLUDE//,/+}.tar
HELPER_TAR=$CACHE/helper-$SUITE-minbase-${USER_INCLUDE//,/+}+$(IFS=+; echo "${HELPER_EXTRA[*]}").tar
BUSYBOX_TAR=$CACHE/busybox-static-$SUITE.tar
SETUP_NAME="podman setup"
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

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
want_conf='# Written by drover tests/setup/podman.sh; see /work/shared/backends.md (Podman section).
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
    # Fully detached: setsid (own session, no controlling terminal), nohup, stdin from /dev/null
    # and stdout/stderr to a log, so it survives this script and never holds the caller's pipes
    # open (a CI step reading our output would otherwise never see EOF). --time=0: never idle out.
    # Every other inherited fd is closed too: our lock (fd 9; the service would hold it for ever)
    # and anything the caller left open. Seen here: the service had kept the write end of a pipe
    # from the shell that ran this script; a caller waiting for EOF on such a pipe never returns.
    (
        for fd in /proc/"$BASHPID"/fd/*; do
            fd=${fd##*/}
            [ "$fd" -le 2 ] || eval "exec $fd>&-"
        done
        exec setsid nohup podman system service --time=0 "$SOCK_URL" >>"$SERVICE_LOG" 2>&1 </dev/null
    ) &
    service_pid=$!
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

build_user_tar() { minbase_tar "$SUITE" "$USER_INCLUDE" "$USER_TAR"; }

build_helper_tar() {
    [ -s "$HELPER_TAR" ] && return 0
    # The helper is the user rootfs plus a few packages: unpack the cached user tarball and
    # apt-get install into it (about 15 s) instead of a second ~55 s debootstrap.
    build_user_tar
    local root=$work/helper
    mkdir -p "$root"
    tar --numeric-owner -xpf "$USER_TAR" -C "$root"
    cp /etc/resolv.conf "$root/etc/resolv.conf"   # name resolution for apt inside the chroot
    in_rootfs "$root" apt-get update -qq </dev/null >"$work/helper-apt.log" 2>&1 \
        && in_rootfs "$root" apt-get install -y -qq --no-install-recommends "${HELPER_EXTRA[@]}" \
            </dev/null >>"$work/helper-apt.log" 2>&1 \
        || { tail -n 30 "$work/helper-apt.log" >&2; die "apt-get install ${HELPER_EXTRA[*]} in the helper rootfs failed"; }
    for tool in git curl tar bash setsid ps; do
        in_rootfs "$root" sh -c "command -v $tool" >/dev/null || die "helper rootfs lacks $tool"
    done
    slim "$root"
    tar_atomic "$root" "$HELPER_TAR"
    rm -rf --one-file-system "$root"
}

build_busybox_tar() {
    [ -s "$BUSYBOX_TAR" ] && return 0
    local dl=$work/busybox-deb root=$work/busybox
    mkdir -p "$root"
    download_busybox_static "$dl"
    mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,root,var/tmp}
    chmod 1777 "$root/tmp" "$root/var/tmp"
    install -m 0755 "$dl/x/bin/busybox" "$root/bin/busybox"
    # One symlink per applet (sh, sleep, cat, echo, nc, ls, mkdir, rm, printf, kill, ...), all in
    # /bin. The binary is static, so the host can run it to list its applets.
    local applet
    for applet in $("$root/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    for applet in sh sleep cat echo nc ls mkdir rm printf kill; do
        [ -L "$root/bin/$applet" ] || die "busybox-static has no applet $applet"
    done
    # A root user, so `id`, `whoami` and podman's user lookup behave.
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    tar_atomic "$root" "$BUSYBOX_TAR"
    rm -rf --one-file-system "$root" "$dl"
}

# ensure_image NAME BUILD_FUNCTION TARBALL SHELL
ensure_image() {
    local name=$1 build=$2 tarball=$3 shell=$4 how
    if podman image exists "$name"; then
        say "image $name present"
        return 0
    fi
    if [ -s "$tarball" ]; then how="imported from cached $tarball"; else how="built and imported (cached as $tarball)"; fi
    "$build"
    # An imported image has no config: give it a PATH and a default command.
    podman import --quiet --change "ENV $IMAGE_PATH_ENV" --change "CMD [\"$shell\"]" \
        "$tarball" "$name" </dev/null >/dev/null || die "podman import $tarball as $name failed"
    say "image $name $how"
}

ensure_image "$USER_IMAGE" build_user_tar "$USER_TAR" /bin/bash
ensure_image "$HELPER_IMAGE" build_helper_tar "$HELPER_TAR" /bin/bash
ensure_image "$BUSYBOX_IMAGE" build_busybox_tar "$BUSYBOX_TAR" /bin/sh

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
