# Helpers shared by tests/setup/podman.sh and tests/setup/lxd.sh (sourced, not run). The caller
# sets SETUP_NAME (e.g. "lxd setup"), which starts every line these helpers print, and `work`, a
# scratch directory, before it builds anything. Traps cited ("backends.md") are described in
# docs/backends.md.

IMAGE_PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
t0=$(now_ms)
step_start=$t0
say() { # one summary line per step, with the step's duration
    local now; now=$(now_ms)
    printf '%s: %s (%d.%01d s)\n' "$SETUP_NAME" "$*" $(( (now - step_start) / 1000 )) $(( (now - step_start) % 1000 / 100 ))
    step_start=$now
}
die() { echo "$SETUP_NAME: ERROR: $*" >&2; exit 1; }

# require_root_debian WHY: both scripts install packages and run daemons.
require_root_debian() {
    [ "$(id -u)" = 0 ] || die "must run as root ($1)"
    command -v apt-get >/dev/null || die "needs apt-get (Debian)"
}

# start_detached LOG CMD...: starts a daemon fully detached and sets `detached_pid`: setsid (own
# session, no controlling terminal), nohup, stdin from /dev/null and stdout/stderr appended to
# LOG, so it survives the script and never holds the caller's pipes open (a CI step reading our
# output would otherwise never see EOF). Every other inherited fd is closed too: the script's
# lock (fd 9; the daemon would hold it for ever) and anything the caller left open (podman's
# service was seen keeping the write end of a caller's pipe).
start_detached() {
    local log=$1; shift
    (
        for fd in /proc/"$BASHPID"/fd/*; do
            fd=${fd##*/}
            [ "$fd" -le 2 ] || eval "exec $fd>&-"
        done
        # A daemon outlives the checkout it was started from: a working directory that is
        # removed later breaks what it starts (conmon: "Failed to get working directory").
        cd / || exit 1
        exec setsid nohup "$@" >>"$log" 2>&1 </dev/null
    ) &
    detached_pid=$!
}

# ensure_packages [--no-recommends] PKG...: installs the packages that are missing. apt-get
# update (about 1 s) only when something is missing; DPkg::Lock::Timeout waits (bounded) instead
# of failing if another apt is running. apt's output only on failure (a successful install still
# prints debconf notes on stderr).
ensure_packages() {
    local recommends=() pkg need=() out
    if [ "$1" = --no-recommends ]; then recommends=(--no-install-recommends); shift; fi
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
    done
    if [ "${#need[@]}" -eq 0 ]; then
        say "packages present ($*)"
        return 0
    fi
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    out=$(apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${recommends[@]}" "${need[@]}" </dev/null 2>&1) \
        || { printf '%s\n' "$out" >&2; die "apt-get install ${need[*]} failed (output above)"; }
    say "installed ${need[*]}"
}

# tar_atomic DIR FILE [MEMBERS...]: write FILE atomically (a killed run must not leave a truncated
# tarball that later runs would import). Default member: the whole directory (".").
tar_atomic() {
    local dir=$1 file=$2; shift 2
    [ "$#" -gt 0 ] || set -- .
    tar --numeric-owner -C "$dir" -cf "$file.tmp" "$@" && mv "$file.tmp" "$file"
}

# in_rootfs DIR CMD...: run CMD chrooted in DIR with /proc mounted (some maintainer scripts read
# it). The mount lives in a private mount+PID namespace, so it disappears with the command even if
# we are killed: nothing is left mounted on the host.
in_rootfs() {
    local root=$1; shift
    unshare --fork --pid --mount --mount-proc="$root/proc" \
        chroot "$root" /usr/bin/env -i HOME=/root "$IMAGE_PATH_ENV" DEBIAN_FRONTEND=noninteractive "$@"
}

# debootstrap_minbase SUITE INCLUDE ROOT: a minbase Debian rootfs with INCLUDE (comma list) in
# ROOT, from $MIRROR when set, slimmed (see `slim`). debootstrap mounts proc/sys in the target; a
# private mount namespace keeps those mounts off the host if it dies half-way. </dev/null: CI has
# no stdin.
debootstrap_minbase() {
    local suite=$1 include=$2 root=$3
    unshare --mount --fork debootstrap --variant=minbase --include="$include" \
        "$suite" "$root" ${MIRROR:+"$MIRROR"} >"$work/debootstrap.log" 2>&1 </dev/null \
        || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap $suite failed (log above)"; }
    slim "$root"
}

# minbase_tar SUITE INCLUDE TAR: a job image's rootfs (debootstrap_minbase) as the tarball TAR,
# unless it is cached already. Both setups build their Debian job image from this file (the same
# file when INCLUDE is the same), so its checks are here, whichever script builds it: it must not
# have git (it stands for "an image without git or gitlab-runner") and must have what the drivers
# run in a job environment.
minbase_tar() {
    local suite=$1 include=$2 tarball=$3 root=$work/minbase tool
    [ -s "$tarball" ] && return 0
    debootstrap_minbase "$suite" "$include" "$root"
    [ ! -e "$root/usr/bin/git" ] || die "the $suite rootfs unexpectedly contains git"
    for tool in bash setsid ps kill find; do
        in_rootfs "$root" sh -c "command -v $tool" >/dev/null || die "the $suite rootfs lacks $tool"
    done
    tar_atomic "$root" "$tarball"
    rm -rf --one-file-system "$root"
}

# slim DIR: drop what makes an image big or leaks the host: downloaded .debs, apt lists (apt-get
# update restores them), and the host's resolv.conf that debootstrap copied in (the engines mount
# their own).
slim() {
    rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/* \
        "$1"/debootstrap
    : >"$1/etc/resolv.conf"
}

# download_busybox_static DIR: the static busybox binary, at DIR/x/bin/busybox. Only downloaded
# and unpacked: installing busybox-static on the host could conflict with a `busybox` package.
# apt-get download needs package lists: on a fresh machine where nothing was installed there may
# be none, so update once and retry. Sandbox user root: _apt cannot write to our 0700 work dir.
download_busybox_static() {
    local dl=$1
    mkdir -p "$dl"
    ( cd "$dl" && apt-get -o APT::Sandbox::User=root download -qq busybox-static </dev/null >/dev/null 2>&1 ) \
        || { apt-get -o DPkg::Lock::Timeout=300 update -qq \
             && ( cd "$dl" && apt-get -o APT::Sandbox::User=root download -qq busybox-static </dev/null ); } \
        || die "apt-get download busybox-static failed"
    dpkg-deb -x "$dl"/busybox-static_*.deb "$dl/x"
}
