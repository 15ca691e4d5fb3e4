#!/usr/bin/env bash
# Sets up an LXD daemon and the image the LXD driver's tests use, on a Debian 12 machine of the
# project's kind (run as root). Idempotent: a second run on the same machine changes nothing and
# takes a few seconds. Every trap cited below ("backends.md") is described in
# docs/backends.md, intro and section "LXD (Debian's 5.0.2; Incus speaks the same API)".
#
# Result:
#   - an LXD daemon (`lxd --group root`, left running) answering on /var/lib/lxd/unix.socket;
#   - storage pool `default` (driver dir) and a default profile holding only the root disk (no
#     network device: exec needs none, and tests must not connect into a bridge);
#   - the API on https://127.0.0.1:8443 as well (loopback only), for the remote-daemon tests;
#   - image alias drover-test/debian (no registry is reachable, so it is built here from Debian
#     packages): debootstrap minbase + procps + an init, with bash, coreutils, util-linux, procps
#     and tar, and neither git nor gitlab-runner (it stands for "an image without gitlab-runner");
#   - tarballs cached in /var/cache/drover/images/ (the rootfs, and the unified LXD image made
#     from it), so a rerun after `lxc image delete` imports instead of running debootstrap again.
#
# Environment: DROVER_DEBIAN_MIRROR (default: debootstrap's own default mirror).
set -euo pipefail

LXD_DIR=/var/lib/lxd
SOCK_PATH=$LXD_DIR/unix.socket
HTTPS_ADDRESS=127.0.0.1:8443
DAEMON_LOG=/var/log/drover-lxd.log
CACHE=/var/cache/drover/images
MIRROR=${DROVER_DEBIAN_MIRROR:-}
SUITE=bookworm
IMAGE=drover-test/debian
CHECK_INSTANCE=drover-setup-check
# The init the image boots (backends.md: the minbase rootfs has no /sbin/init and LXD cannot
# start it without one). "busybox": /sbin/init -> busybox with a two-line inittab, on top of the
# same minbase + procps rootfs the podman setup builds (shared cache file). "systemd": add
# systemd-sysv to debootstrap's --include. Both start here and exec works 60 ms after
# `lxc launch` returns with either. busybox, because launch time is almost all unpacking the
# image into the dir pool (plus the uid shift), so it grows with the image. Measured in the same
# minutes, another job running: busybox 120 MB, launch 7.5-9.5 s (`lxc init` alone 6.4 s);
# systemd 142 MB, launch 10.4-10.8 s (`lxc init` 10.1 s), and its boot keeps running during the
# first execs. Starting an existing instance takes 0.2-0.5 s with either. Cost: `lxc stop` without -f takes about 3 s (busybox init's halt waits
# after SIGTERM) against 0.8 s for systemd; `lxc delete -f` / `lxc stop -f` are immediate.
INIT_VARIANT=busybox
case $INIT_VARIANT in
    busybox) ROOTFS_INCLUDE=procps ;;
    systemd) ROOTFS_INCLUDE=systemd-sysv,procps ;;
    *) echo "lxd setup: ERROR: unknown INIT_VARIANT $INIT_VARIANT" >&2; exit 1 ;;
esac
# Cache file names carry the recipe, so changing the lists above builds new tarballs instead of
# silently importing stale ones. The rootfs tarball has the layout (and, for the busybox variant,
# the name and content) of tests/setup/podman.sh's user rootfs, so either script reuses the other's.
ROOTFS_TAR=$CACHE/debian-$SUITE-minbase-${ROOTFS_INCLUDE//,/+}.tar
RECIPE=debian-$SUITE-minbase-${ROOTFS_INCLUDE//,/+}-init-$INIT_VARIANT-lo
LXD_TAR=$CACHE/lxd-$RECIPE.tar
# Goes into the image's description property: a rerun compares it to find an image built from an
# older recipe and replaces it.
DESCRIPTION="drover test image ($RECIPE; no git, no gitlab-runner)"
# The lxc client keeps its configuration under $HOME/.config/lxc; CI may run us without HOME.
export HOME=${HOME:-/root}

SETUP_NAME="lxd setup"
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_root_debian "installs packages, runs the LXD daemon"

# Work directory for image builds, on the cache's file system. Removed on exit however we exit
# (and the check instance with it). --one-file-system: if a killed debootstrap ever left proc/sys
# mounted inside a rootfs, rm must not descend into the host's /proc or /sys.
mkdir -p "$CACHE"
work=
check_launched=false
cleanup() {
    if $check_launched; then timeout 60 lxc delete -f "$CHECK_INSTANCE" >/dev/null 2>&1 || true; fi
    [ -z "$work" ] || rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# Two runs at once (CI plus a developer) would race on the cache, on starting the daemon and on
# the check instance's name: serialise them, with a bounded wait.
exec 9>/var/cache/drover/lxd-setup.lock
flock -w 900 9 || die "another tests/setup/lxd.sh has held /var/cache/drover/lxd-setup.lock for 15 min"
[ $(( $(now_ms) - step_start )) -lt 1000 ] || say "waited for another run's lock"

# ---------------------------------------------------------------------------------------------
# 1. Packages, without recommends as backends.md installed and tested them. debootstrap builds the
#    image (no registry reachable), curl asks the API socket. busybox-static is not installed on
#    the host: its .deb is only downloaded and unpacked into the image (step 4). openssl makes the
#    remote-daemon tests' client certificates.
ensure_packages --no-recommends lxd lxd-client debootstrap curl tar openssl

# ---------------------------------------------------------------------------------------------
# 2. The daemon. No systemd here (PID 1 is not systemd; apt starts no service), so we start it
#    ourselves, and only if nobody answers on the socket: a second `lxd` just exits 1 with "LXD is
#    already running" (backends.md), but asking first avoids that noise and a wrong diagnosis.
#    A stale socket file left by a killed daemon is harmless (lxd replaces it).
api_up() { curl -sf --max-time 3 --unix-socket "$SOCK_PATH" http://lxd/1.0 >/dev/null 2>&1; }
if api_up; then
    started="already running"
else
    start_detached "$DAEMON_LOG" lxd --group root
    daemon_pid=$detached_pid
    # Ready in under 1 s here (backends.md); waitready is bounded by its own timeout, and a
    # daemon that died at once is reported with its log rather than after 30 s.
    sleep 0.2
    kill -0 "$daemon_pid" 2>/dev/null || { tail -n 20 "$DAEMON_LOG" >&2; die "lxd exited at once (log above, $DAEMON_LOG)"; }
    timeout 40 lxd waitready --timeout 30 </dev/null \
        || { tail -n 20 "$DAEMON_LOG" >&2; die "lxd (pid $daemon_pid) not ready within 30 s (log above, $DAEMON_LOG)"; }
    api_up || die "lxd (pid $daemon_pid) says ready but $SOCK_PATH does not answer"
    started="started, pid $daemon_pid, log $DAEMON_LOG"
fi
version=$(curl -sf --max-time 3 --unix-socket "$SOCK_PATH" http://lxd/1.0 \
    | sed -n 's/.*"server_version":"\([^"]*\)".*/\1/p')
say "LXD ${version:-?} ready on $SOCK_PATH ($started)"

# ---------------------------------------------------------------------------------------------
# 3. Storage pool and default profile, exactly as backends.md: a `dir` pool and only the root disk
#    in the default profile (no network device: exec needs none). Only when the pool is missing;
#    running the preseed again would be harmless (backends.md) but is not needed.
if timeout 30 lxc storage show default </dev/null >/dev/null 2>&1; then
    say "storage pool default present"
else
    timeout 60 lxd init --preseed >/dev/null <<'EOF' || die "lxd init --preseed failed"
storage_pools:
- {name: default, driver: dir}
profiles:
- name: default
  devices:
    root: {path: /, pool: default, type: disk}
EOF
    say "created storage pool default (dir) and default profile (root disk only)"
fi
# An existing default profile without a root disk (someone else's preseed) would make every
# launch fail with a less obvious error.
[ "$(timeout 30 lxc profile device get default root pool </dev/null 2>/dev/null)" = default ] \
    || die "the default profile has no root disk on pool default; see 'lxc profile show default'"

# The remote-daemon tests talk HTTPS to this daemon; loopback only (tests never leave it). They
# make and trust their own client certificates (openssl, `lxc config trust add`).
if [ "$(timeout 30 lxc config get core.https_address </dev/null)" = "$HTTPS_ADDRESS" ]; then
    say "API also on https://$HTTPS_ADDRESS"
else
    timeout 30 lxc config set core.https_address "$HTTPS_ADDRESS" </dev/null \
        || die "lxc config set core.https_address $HTTPS_ADDRESS failed"
    say "API now also on https://$HTTPS_ADDRESS"
fi

# ---------------------------------------------------------------------------------------------
# 4. The image. No image registry is reachable (backends.md): build the rootfs from Debian
#    packages, cache it as a tarball, wrap it into a unified LXD image tarball (metadata.yaml +
#    templates/ + rootfs/), cache that too and import it. Everything is skipped when the image
#    exists with the current recipe.
work=$(mktemp -d "$CACHE/.build.XXXXXX")

# add_busybox_init ROOT: /sbin/init -> busybox (static, from the busybox-static .deb, which is only
# downloaded: installing it on the host could conflict with a `busybox` package) with an inittab
# that runs nothing and keeps one child alive.
add_busybox_init() {
    local root=$1 dl=$work/busybox-deb
    download_busybox_static "$dl"
    # Outside /bin and /usr/bin so that no busybox applet shadows a real tool on PATH.
    install -D -m 0755 "$dl/x/bin/busybox" "$root/usr/lib/drover/busybox"
    # Absolute target: sbin is itself a symlink to usr/sbin (merged /usr), so a relative one would
    # resolve from usr/sbin.
    rm -f "$root/sbin/init"
    ln -s /usr/lib/drover/busybox "$root/sbin/init"
    # Loopback up (nothing else would bring it up): jobs reach host services through proxy
    # devices listening on 127.0.0.1 in the instance.
    printf '%s\n' '# drover test image: busybox init, loopback up; keep one child alive.' \
        '::sysinit:/usr/lib/drover/busybox ifconfig lo up' '::respawn:/bin/sleep 2147483647' >"$root/etc/inittab"
}

build_lxd_tar() {
    [ -s "$LXD_TAR" ] && return 0
    # tests/setup/podman.sh's user rootfs too: for the busybox variant they are one file.
    minbase_tar "$SUITE" "$ROOTFS_INCLUDE" "$ROOTFS_TAR"
    local img=$work/image root=$work/image/rootfs
    mkdir -p "$root" "$img/templates"
    tar --numeric-owner -xpf "$ROOTFS_TAR" -C "$root"
    case $INIT_VARIANT in
        busybox) add_busybox_init "$root" ;;
        # Every instance would share the build's machine id; empty, systemd makes one per boot.
        systemd) : >"$root/etc/machine-id" ;;
    esac
    # What the image must have, and must not have (it stands for "an image without
    # gitlab-runner"; the driver pushes one in).
    local tool
    for tool in bash ls cat setsid mount ps kill tar; do
        in_rootfs "$root" sh -c "command -v $tool" >/dev/null || die "rootfs lacks $tool"
    done
    in_rootfs "$root" test -x /sbin/init || die "rootfs has no executable /sbin/init"
    for tool in git gitlab-runner; do
        ! in_rootfs "$root" sh -c "command -v $tool" >/dev/null || die "rootfs unexpectedly contains $tool"
    done
    # /etc/hostname is the build host's (debootstrap copies it), and systemd would set it: write
    # the instance's name there on create and copy, as the images LXD downloads do.
    printf '{{ container.name }}\n' >"$img/templates/hostname.tpl"
    cat >"$img/metadata.yaml" <<EOF
architecture: x86_64
creation_date: $(date +%s)
properties:
  description: "$DESCRIPTION"
  os: debian
  release: $SUITE
templates:
  /etc/hostname:
    when: [create, copy]
    template: hostname.tpl
EOF
    tar_atomic "$img" "$LXD_TAR" metadata.yaml templates rootfs
    rm -rf --one-file-system "$img"
}

have_desc=$(timeout 30 lxc image get-property "$IMAGE" description </dev/null 2>/dev/null) || have_desc=
if timeout 30 lxc image info "$IMAGE" </dev/null >/dev/null 2>&1 && [ "$have_desc" = "$DESCRIPTION" ]; then
    say "image $IMAGE present ($RECIPE)"
else
    if [ -s "$LXD_TAR" ]; then how="imported from cached $LXD_TAR"
    elif [ -s "$ROOTFS_TAR" ]; then how="built from cached $ROOTFS_TAR and imported (cached as $LXD_TAR)"
    else how="built and imported (cached as $ROOTFS_TAR and $LXD_TAR)"; fi
    build_lxd_tar
    if timeout 30 lxc image info "$IMAGE" </dev/null >/dev/null 2>&1; then
        # Built from another recipe (description differs). A rebuilt image under an existing
        # alias fails to import (backends.md): delete the old one first. Running instances keep
        # their own copy of the rootfs.
        timeout 60 lxc image delete "$IMAGE" </dev/null || die "lxc image delete $IMAGE (old recipe: $have_desc) failed"
        how="$how, replacing an image of another recipe"
    fi
    # The same tarball may already be in the store without the alias (someone removed only the
    # alias): import refuses it ("Image with same fingerprint already exists"), so alias it.
    fingerprint=$(sha256sum "$LXD_TAR" | cut -d' ' -f1)
    if timeout 30 lxc image info "$fingerprint" </dev/null >/dev/null 2>&1; then
        timeout 30 lxc image alias create "$IMAGE" "$fingerprint" </dev/null || die "lxc image alias create $IMAGE failed"
        how="aliased: the image of $LXD_TAR was in the store without the alias"
    else
        timeout 300 lxc image import "$LXD_TAR" --alias "$IMAGE" </dev/null >/dev/null \
            || die "lxc image import $LXD_TAR --alias $IMAGE failed"
    fi
    say "image $IMAGE $how"
fi

# ---------------------------------------------------------------------------------------------
# 5. Check, bounded: launch an instance (the default profile has no network device; none is
#    needed), wait until exec works, check an exit code comes through, delete it. A check instance
#    left by a killed run is deleted first.
timeout 60 lxc delete -f "$CHECK_INSTANCE" </dev/null >/dev/null 2>&1 || true
launch_ms=$(now_ms)
check_launched=true
# Output only on failure: on success it is a note that the instance has no network, which is
# what we want.
out=$(timeout 120 lxc launch "$IMAGE" "$CHECK_INSTANCE" </dev/null 2>&1) \
    || { printf '%s\n' "$out" >&2; die "lxc launch $IMAGE $CHECK_INSTANCE failed (output above)"; }
launched_ms=$(now_ms)
ok=false
for _ in $(seq 60); do
    if timeout 10 lxc exec "$CHECK_INSTANCE" -- true </dev/null >/dev/null 2>&1; then ok=true; break; fi
    sleep 0.5
done
$ok || die "lxc exec $CHECK_INSTANCE -- true did not succeed within 30 s of its launch"
exec_ms=$(now_ms)
rc=0
out=$(timeout 30 lxc exec "$CHECK_INSTANCE" -- bash -c 'echo hi; exit 3' </dev/null 2>&1) || rc=$?
[ "$rc" = 3 ] && [ "$out" = hi ] || die "lxc exec ... bash -c 'echo hi; exit 3' gave exit $rc, output '$out' (want 3, 'hi')"
if timeout 10 lxc exec "$CHECK_INSTANCE" -- sh -c 'command -v curl' </dev/null >/dev/null 2>&1; then
    curl_note="curl present"
else
    curl_note="no curl"
fi
timeout 60 lxc delete -f "$CHECK_INSTANCE" </dev/null >/dev/null || die "lxc delete -f $CHECK_INSTANCE failed"
check_launched=false
printf -v launch_s '%d.%02d' $(( (launched_ms - launch_ms) / 1000 )) $(( (launched_ms - launch_ms) % 1000 / 10 ))
printf -v exec_s '%d.%02d' $(( (exec_ms - launch_ms) / 1000 )) $(( (exec_ms - launch_ms) % 1000 / 10 ))
say "checked: launch ${launch_s} s, first exec ${exec_s} s after launch, exit 3 comes through, $curl_note, deleted"

step_start=$t0
say "done"
