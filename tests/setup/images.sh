# The container images the podman driver's tests use, on podman and on Docker alike (sourced by
# tests/setup/podman.sh and tests/setup/docker.sh after common.sh). No image registry is reachable
# (docs/backends.md), so each is a root file system built from Debian packages, cached as a
# tarball under $CACHE (a rerun, or the other engine, imports it instead of building it again)
# and imported with the engine's CLI:
#   localhost/drover-test/debian:bookworm   user image: minbase + procps, no git/gitlab-runner
#   localhost/drover-test/helper:bookworm   the same + git, ca-certificates, curl (helper image;
#                                           the driver bind-mounts gitlab-runner into it)
#   localhost/drover-test/busybox:latest    busybox-static only (service containers: nc -l -p)
# The caller sets `work`, a scratch directory on the cache's file system, before it builds.

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

# ensure_image CLI NAME BUILD_FUNCTION TARBALL SHELL: the image NAME in the engine that CLI
# (`podman`, or `docker` with DOCKER_HOST set) talks to, imported from TARBALL, which
# BUILD_FUNCTION makes unless it is cached. Both CLIs take the same `image inspect` and `import`.
ensure_image() {
    local cli=$1 name=$2 build=$3 tarball=$4 shell=$5 how
    if "$cli" image inspect "$name" >/dev/null 2>&1; then
        say "image $name present"
        return 0
    fi
    if [ -s "$tarball" ]; then how="imported from cached $tarball"; else how="built and imported (cached as $tarball)"; fi
    "$build"
    # An imported image has no config: give it a PATH and a default command.
    "$cli" import --change "ENV $IMAGE_PATH_ENV" --change "CMD [\"$shell\"]" \
        "$tarball" "$name" </dev/null >/dev/null || die "$cli import $tarball as $name failed"
    say "image $name $how"
}

# ensure_images CLI: the three test images in CLI's engine.
ensure_images() {
    ensure_image "$1" "$USER_IMAGE" build_user_tar "$USER_TAR" /bin/bash
    ensure_image "$1" "$HELPER_IMAGE" build_helper_tar "$HELPER_TAR" /bin/bash
    ensure_image "$1" "$BUSYBOX_IMAGE" build_busybox_tar "$BUSYBOX_TAR" /bin/sh
}

