#!/usr/bin/env bash
# Sets up libvirt + QEMU and the small VM guest the libvirt driver's tests boot, on a Debian 12
# machine of the project's kind (run as root). Idempotent: a second run on the same machine
# changes nothing and takes a few seconds plus one test boot. Every trap cited below
# ("backends.md") is described in docs/backends.md, intro and section "libvirt and QEMU".
#
# Result:
#   - virtlogd and libvirtd (left running), qemu:///system answering on
#     /run/libvirt/libvirt-sock, with QEMU run as root (qemu.conf); libvirt's default network is
#     left defined and stopped;
#   - the guest, cached in /var/cache/drover/images/ under recipe-named files, behind three
#     stable symlinks the tests use:
#       libvirt-guest.img      raw ext4 root file system (sparse, 2G, label drover-root): the
#                              helper rootfs of tests/setup/images.sh (minbase + procps, git,
#                              ca-certificates, curl, tar) + the cloud kernel's modules, busybox
#                              init and drover-guest-agent on the org.drover.* virtio-serial ports;
#       libvirt-guest.vmlinuz  the newest /boot/vmlinuz-*-cloud-amd64, for direct kernel boot;
#       libvirt-guest.initrd   its initrd;
#     the guest needs console=ttyS0 root=/dev/vda rw, prints `drover test guest: ready` on the
#     serial console when it is up, and configures 10.0.2.15/24 via 10.0.2.2 (QEMU user-mode
#     networking) on its first NIC, if it has one. No ssh, root's password locked.
#   - checked by one boot under TCG (transient domain drover-setup-check, qcow2 overlay), which is
#     destroyed again.
#
# `tests/setup/libvirt.sh --bench` does all of that and also makes the guest of the libvirt
# benchmark (drivers/libvirt/benches/stages.rs), which CI does not need:
#   - /var/cache/drover/bench-ssh/id_ed25519(.pub): a key made once, for the bench only;
#   - libvirt-bench-guest.{img,vmlinuz,initrd}: the same guest plus openssh-server, started by
#     busybox init (`::respawn:/usr/sbin/sshd -D`), root login by that key only (no password
#     login), host keys made when the image is built (every VM of it has the same ones: fine for
#     a bench, wrong for anything else); the same kernel and initrd;
#   - checked by one more boot: the ready line, the agent's hello, and `ssh root@ true` through a
#     user-mode networking port forward from 127.0.0.1.
#
# Environment: DROVER_DEBIAN_MIRROR (default: debootstrap's own default mirror; only used when
# the helper rootfs has to be built).
set -euo pipefail

VIRSH=(virsh -c qemu:///system)
QEMU_CONF=/etc/libvirt/qemu.conf
VIRTLOGD_SOCK=/run/libvirt/virtlogd-sock
VIRTLOGD_LOG=/var/log/drover-virtlogd.log
LIBVIRTD_LOG=/var/log/drover-libvirtd.log
CHECK_DOMAIN=drover-setup-check
SETUP_NAME="libvirt setup"
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# CACHE, SUITE, HELPER_TAR, build_helper_tar (which the podman setup calls too).
# shellcheck source=tests/setup/images.sh
. "$(dirname "${BASH_SOURCE[0]}")/images.sh"
BENCH=false
case "${1:-}" in
    "") ;;
    --bench) BENCH=true ;;
    *) die "usage: tests/setup/libvirt.sh [--bench]" ;;
esac
BENCH_KEY=/var/cache/drover/bench-ssh/id_ed25519
AGENT_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/drivers/libvirt/guest/drover-guest-agent
BB=/usr/lib/drover/busybox

require_root_debian "installs packages, runs libvirtd"
[ -r "$AGENT_SRC" ] || die "no $AGENT_SRC"

# Work directory for the guest build and the check's overlay, sockets and console log, on the
# cache's file system. Removed on exit however we exit (and the check domain with it).
# --one-file-system: never descend into a mount a killed build might have left in a rootfs.
mkdir -p "$CACHE"
work=
check_started=false
cleanup() {
    if $check_started; then timeout 30 "${VIRSH[@]}" destroy "$CHECK_DOMAIN" </dev/null >/dev/null 2>&1 || true; fi
    [ -z "$work" ] || rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# Two runs at once would race on the cache, on starting the daemons (backends.md rerun trap) and
# on the check domain's name: serialise them, with a bounded wait.
exec 9>/var/cache/drover/libvirt-setup.lock
flock -w 900 9 || die "another tests/setup/libvirt.sh has held /var/cache/drover/libvirt-setup.lock for 15 min"
[ $(( $(now_ms) - step_start )) -lt 1000 ] || say "waited for another run's lock"

# ---------------------------------------------------------------------------------------------
# 1. Packages, without recommends as backends.md installed and tested them. The cloud kernel is
#    the guest's (it boots under TCG in a few seconds); e2fsprogs makes the image without a loop
#    device; qemu-utils for the tests' qcow2 overlays.
ensure_packages --no-recommends libvirt-daemon-system libvirt-clients libvirt-dev pkg-config \
    qemu-system-x86 qemu-utils linux-image-cloud-amd64 e2fsprogs debootstrap curl tar
command -v python3 >/dev/null || die "needs python3 (the check talks to the guest's channel with it)"
# The bench guest's key and its check's ssh.
if $BENCH; then ensure_packages --no-recommends openssh-client; fi

# ---------------------------------------------------------------------------------------------
# 2. QEMU as root (backends.md): /dev/kvm is 0600 root with no udev and QEMU runs as
#    libvirt-qemu, so libvirt re-probes QEMU on every call and `virsh create` took 44 s. Every
#    uncommented user/group line goes, ours are appended: rerunning gives the same file.
conf_mark="# Set by drover tests/setup/libvirt.sh (docs/backends.md, libvirt and QEMU)."
[ -e "$QEMU_CONF" ] || { mkdir -p "${QEMU_CONF%/*}"; : >"$QEMU_CONF"; }
want_conf=$(awk -v mark="$conf_mark" '$0 != mark && !/^[ \t]*(user|group)[ \t]*=/' "$QEMU_CONF"
            printf '%s\nuser = "root"\ngroup = "root"\n' "$conf_mark")
conf_changed=false
if [ "$(cat "$QEMU_CONF")" != "$want_conf" ]; then
    cp -p "$QEMU_CONF" "$QEMU_CONF.drover-backup"
    printf '%s\n' "$want_conf" >"$QEMU_CONF.tmp" && chmod --reference="$QEMU_CONF" "$QEMU_CONF.tmp" \
        && mv "$QEMU_CONF.tmp" "$QEMU_CONF"
    conf_changed=true
    say "set user = \"root\", group = \"root\" in $QEMU_CONF"
else
    say "$QEMU_CONF already runs QEMU as root"
fi

# ---------------------------------------------------------------------------------------------
# 3. The daemons. No systemd here (PID 1 is not systemd; apt starts no service), so we start them
#    ourselves, in the foreground under start_detached (never -d), and only if the running one
#    does not answer: a second `libvirtd -d` deletes the running daemon's sockets (backends.md).
#    Without virtlogd every domain start fails. The default network stays down.

# find_daemon NAME: sets `pid` to the system NAME's pid (from its pid file, else the only such
# process); fails if there is none.
find_daemon() {
    pid=$(cat "/run/$1.pid" 2>/dev/null) || pid=
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && return 0
    pid=$(pgrep -x "$1") || { pid=; return 1; }
    [ "$(wc -w <<<"$pid")" = 1 ] || die "several $1 processes ($(echo $pid)) and none in /run/$1.pid: stop the stray ones"
}
# stop_daemon NAME PID WHY: SIGTERM, bounded wait (30 s), then SIGKILL.
stop_daemon() {
    kill "$2" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$2" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$2" 2>/dev/null || true
    sleep 0.5
    ! kill -0 "$2" 2>/dev/null || die "$1 (pid $2, $3) does not exit even on SIGKILL"
}

mkdir -p /run/libvirt
if [ -S "$VIRTLOGD_SOCK" ] && find_daemon virtlogd; then
    started="already running, pid $pid"
else
    # A virtlogd without its socket is deaf, and would keep the pid file from a new one.
    if find_daemon virtlogd; then stop_daemon virtlogd "$pid" "no $VIRTLOGD_SOCK"; fi
    start_detached "$VIRTLOGD_LOG" virtlogd
    pid=$detached_pid
    for _ in $(seq 50); do
        [ -S "$VIRTLOGD_SOCK" ] && break
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$VIRTLOGD_LOG" >&2; die "virtlogd exited at once (log above, $VIRTLOGD_LOG)"; }
        sleep 0.2
    done
    [ -S "$VIRTLOGD_SOCK" ] || die "virtlogd (pid $pid) made no $VIRTLOGD_SOCK within 10 s; see $VIRTLOGD_LOG"
    started="started, pid $pid, log $VIRTLOGD_LOG"
fi
say "virtlogd on $VIRTLOGD_SOCK ($started)"

libvirt_up() { timeout 10 "${VIRSH[@]}" version </dev/null >/dev/null 2>&1; }
start_libvirtd() {
    start_detached "$LIBVIRTD_LOG" libvirtd
    local pid=$detached_pid
    # Ready in under 1 s (backends.md), plus its first QEMU probe on a fresh machine: allow 30 s.
    for _ in $(seq 60); do
        libvirt_up && break
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$LIBVIRTD_LOG" >&2; die "libvirtd exited at once (log above, $LIBVIRTD_LOG)"; }
        sleep 0.5
    done
    libvirt_up || { tail -n 20 "$LIBVIRTD_LOG" >&2; die "libvirtd (pid $pid) does not answer on qemu:///system within 30 s (log above, $LIBVIRTD_LOG)"; }
    started="started, pid $pid, log $LIBVIRTD_LOG"
}
if libvirt_up; then
    if $conf_changed; then
        # qemu.conf is read at start only: restart it (running domains live on; none of ours).
        find_daemon libvirtd || die "qemu:///system answers but no libvirtd process is found to restart for $QEMU_CONF"
        stop_daemon libvirtd "$pid" "restarted for $QEMU_CONF"
        start_libvirtd
        started="restarted for $QEMU_CONF; $started"
    else
        started="already running"
    fi
else
    # A libvirtd that lives on without its socket (the rerun trap): kill it by pid first.
    deaf=
    if find_daemon libvirtd; then stop_daemon libvirtd "$pid" "not answering on qemu:///system"; deaf="killed pid $pid, deaf; "; fi
    start_libvirtd
    started="$deaf$started"
fi
versions=$(timeout 10 "${VIRSH[@]}" version </dev/null 2>/dev/null \
    | sed -n 's/^Using library: libvirt \(.*\)/libvirt \1/p; s/^Running hypervisor: \(.*\)/\1/p' | paste -sd' ')
say "${versions:-libvirt} ready on qemu:///system ($started)"

# ---------------------------------------------------------------------------------------------
# 4. The guest. The newest cloud kernel (a kernel update makes a new image: its version is in the
#    recipe, and the image must carry its modules). The rootfs is the helper image's tarball of
#    tests/setup/images.sh (built here if the podman setup has not run). Everything is skipped
#    when the recipe's three files exist; the symlinks are then only checked.
KVER=$(find /boot -maxdepth 1 -name 'vmlinuz-*-cloud-amd64' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V | tail -n1)
[ -n "$KVER" ] || die "no /boot/vmlinuz-*-cloud-amd64 (linux-image-cloud-amd64 installed?)"
for f in "/boot/vmlinuz-$KVER" "/boot/initrd.img-$KVER" "/lib/modules/$KVER/modules.dep"; do
    [ -s "$f" ] || die "no $f"
done

# Modules the cloud kernel has as modules (=m in /boot/config-$KVER) and the guest needs after
# the initramfs: virtio_console for the org.drover.* ports (the initramfs has no virtio_console),
# virtio_net for the NIC (the initramfs' udev usually loads it already). virtio_pci, virtio_blk
# and ext4 (built in) come from the initramfs.
GUEST_MODULES="virtio_console virtio_net"
SYSINIT='#!/bin/sh
# drover test guest: busybox init'"'"'s sysinit (written by tests/setup/libvirt.sh).
bb='"$BB"'
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mnt() { mountpoint -q "$3" || { $bb mkdir -p "$3" && $bb mount -t "$1" -o "$4" "$2" "$3"; }; }
# The initramfs moves /dev, /proc, /sys and /run to the real root: mount what is still missing.
mnt proc proc /proc nosuid,nodev,noexec
mnt sysfs sysfs /sys nosuid,nodev,noexec
mnt devtmpfs devtmpfs /dev nosuid,mode=0755
mnt devpts devpts /dev/pts nosuid,noexec,gid=5,mode=0620,ptmxmode=0666
mnt tmpfs tmpfs /dev/shm nosuid,nodev,mode=1777
mnt tmpfs tmpfs /run nosuid,nodev,mode=0755
mnt tmpfs tmpfs /tmp nosuid,nodev,mode=1777
for m in '"$GUEST_MODULES"'; do $bb modprobe -q "$m" || echo "drover test guest: modprobe $m failed" >/dev/console; done
$bb hostname -F /etc/hostname
$bb ip link set lo up
# No udev here: the NIC is eth0, or ens9 if the initramfs'"'"' udev renamed it.
nic=
if $bb grep -qs "^0x0200" /sys/bus/pci/devices/*/class; then
    for i in $($bb seq 30); do
        for d in /sys/class/net/en* /sys/class/net/eth*; do [ -e "$d" ] && { nic=${d##*/}; break 2; }; done
        $bb sleep 0.1
    done
fi
if [ -n "$nic" ]; then
    $bb ip addr replace 10.0.2.15/24 dev "$nic"
    $bb ip link set "$nic" up
    $bb ip route replace default via 10.0.2.2 dev "$nic"
    echo "nameserver 10.0.2.3" >/etc/resolv.conf
fi
echo "drover test guest: ready" >/dev/console
'
INITTAB='# drover test guest (written by tests/setup/libvirt.sh): mounts, modules, network, then the
# agent on the org.drover.* virtio-serial ports, restarted whenever it exits.
::sysinit:/usr/lib/drover/test-sysinit
::respawn:/usr/lib/drover/drover-guest-agent
::ctrlaltdel:'"$BB"' poweroff
::shutdown:'"$BB"' sync
::shutdown:'"$BB"' mount -o remount,ro /'
FSTAB='/dev/vda / ext4 defaults 0 1'
# The recipe: the rootfs's, the kernel's version and a hash of what we put on top of it, so a
# changed agent, sysinit or inittab makes a new image instead of silently booting a stale one.
content_hash=$( { cat "$AGENT_SRC"; printf '%s\n' "$SYSINIT" "$INITTAB" "$FSTAB"; } | sha256sum | cut -c1-12)
RECIPE=libvirt-guest-$SUITE-helper-busybox-init-$KVER-$content_hash

# The bench guest (--bench): the same, plus sshd. /run is a fresh tmpfs at every boot, so its
# privilege separation directory is made by a second sysinit line (busybox init runs every
# sysinit line, in order, before the respawn lines). A drop-in, read before the packaged
# sshd_config's own settings (sshd keeps the first value of a keyword): root by key only.
BENCH_INITTAB="$INITTAB
::sysinit:$BB mkdir -p -m 0755 /run/sshd
::respawn:/usr/sbin/sshd -D"
BENCH_SSHD_CONF='# drover bench guest (written by tests/setup/libvirt.sh --bench): root by key only.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no'
if $BENCH; then
    # Made once and kept: a new key makes a new image (its public half is in the recipe).
    if [ ! -s "$BENCH_KEY" ] || [ ! -s "$BENCH_KEY.pub" ]; then
        mkdir -p -m 0700 "${BENCH_KEY%/*}"
        rm -rf "${BENCH_KEY%/*}"/.new.*
        keydir=$(mktemp -d "${BENCH_KEY%/*}/.new.XXXXXX")
        ssh-keygen -q -t ed25519 -N '' -C drover-bench -f "$keydir/key" </dev/null || die "ssh-keygen failed"
        # The public half first: a private key in place means both are.
        mv "$keydir/key.pub" "$BENCH_KEY.pub" && mv "$keydir/key" "$BENCH_KEY"
        rmdir "$keydir"
        say "made the bench key $BENCH_KEY"
    fi
    bench_hash=$( { printf '%s\n' "$content_hash" "$BENCH_INITTAB" "$BENCH_SSHD_CONF"; cat "$BENCH_KEY.pub"; } | sha256sum | cut -c1-12)
    BENCH_RECIPE=libvirt-bench-guest-$SUITE-helper-busybox-init-sshd-$KVER-$bench_hash
fi

# A check domain or a work dir left by a killed run (the lock is ours: no other run uses them).
timeout 30 "${VIRSH[@]}" destroy "$CHECK_DOMAIN" </dev/null >/dev/null 2>&1 || true
rm -rf --one-file-system "$CACHE"/.libvirt-build.*
work=$(mktemp -d "$CACHE/.libvirt-build.XXXXXX")

# build_guest RECIPE [bench]: RECIPE.{img,vmlinuz,initrd} in the cache; with `bench`, the guest
# with sshd. Sets built_how.
build_guest() {
    local recipe=$1 mode=${2:-} root=$work/rootfs dl=$work/busybox-deb tool how
    local img=$CACHE/$1.img vmlinuz=$CACHE/$1.vmlinuz initrd=$CACHE/$1.initrd
    if [ -s "$HELPER_TAR" ]; then how="from cached $HELPER_TAR"
    else how="from $HELPER_TAR, built first"; build_helper_tar; fi
    mkdir -p "$root"
    tar --numeric-owner -xpf "$HELPER_TAR" -C "$root"
    if [ ! -x "$root/usr/sbin/mkfs.ext4" ]; then
        # As build_helper_tar installs its extras (the tests format scratch disks in the guest).
        cp /etc/resolv.conf "$root/etc/resolv.conf"
        in_rootfs "$root" apt-get update -qq </dev/null >"$work/guest-apt.log" 2>&1 \
            && in_rootfs "$root" apt-get install -y -qq --no-install-recommends e2fsprogs \
                </dev/null >>"$work/guest-apt.log" 2>&1 \
            || { tail -n 30 "$work/guest-apt.log" >&2; die "apt-get install e2fsprogs in the guest rootfs failed"; }
        slim "$root"
        how="$how + e2fsprogs"
    fi
    # The kernel's modules (merged /usr: /lib is a symlink to usr/lib).
    mkdir -p "$root/usr/lib/modules"
    cp -a "/lib/modules/$KVER" "$root/usr/lib/modules/"
    # busybox init: outside /bin and /usr/bin so that no applet shadows a real tool on PATH;
    # absolute /sbin/init target, as sbin is itself a symlink to usr/sbin.
    download_busybox_static "$dl"
    install -D -m 0755 "$dl/x/bin/busybox" "$root$BB"
    rm -f "$root/sbin/init"
    ln -s "$BB" "$root/sbin/init"
    install -m 0755 "$AGENT_SRC" "$root/usr/lib/drover/drover-guest-agent"
    printf '%s' "$SYSINIT" >"$root/usr/lib/drover/test-sysinit"
    chmod 0755 "$root/usr/lib/drover/test-sysinit"
    printf '%s\n' "$INITTAB" >"$root/etc/inittab"
    printf '%s\n' "$FSTAB" >"$root/etc/fstab"
    echo drover-guest >"$root/etc/hostname"
    : >"$root/etc/machine-id"
    in_rootfs "$root" passwd -l root </dev/null >/dev/null 2>&1 || die "passwd -l root in the guest rootfs failed"
    # What the agent and the sysinit need, and the modules they load.
    for tool in bash head kill mkfifo seq cat mountpoint; do
        in_rootfs "$root" sh -c "command -v $tool" >/dev/null || die "guest rootfs lacks $tool"
    done
    applets=$("$root$BB" --list)
    for tool in ip modprobe hostname mount poweroff sync seq sleep grep mkdir; do
        grep -qx "$tool" <<<"$applets" || die "busybox-static has no applet $tool"
    done
    for tool in $GUEST_MODULES; do
        grep -q "/$tool.ko:" "$root/usr/lib/modules/$KVER/modules.dep" \
            || die "module $tool not in the guest's /lib/modules/$KVER/modules.dep"
    done
    if [ "$mode" = bench ]; then
        add_sshd "$root"
        how="$how + openssh-server"
    fi
    # Sparse raw image, written atomically (a killed run must not leave a half image that later
    # runs would boot).
    rm -f "$img.tmp"
    mke2fs -q -t ext4 -d "$root" -L drover-root "$img.tmp" 2G </dev/null >/dev/null || die "mke2fs -d $root $img.tmp failed"
    cp "/boot/vmlinuz-$KVER" "$vmlinuz.tmp" && mv "$vmlinuz.tmp" "$vmlinuz"
    cp "/boot/initrd.img-$KVER" "$initrd.tmp" && mv "$initrd.tmp" "$initrd"
    mv "$img.tmp" "$img"
    rm -rf --one-file-system "$root" "$dl"
    built_how=$how
}

# add_sshd ROOT: the bench guest's additions to the guest rootfs ROOT. The package's maintainer
# scripts make the host keys; policy-rc.d keeps them from starting an sshd in the chroot.
add_sshd() {
    local root=$1
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    in_rootfs "$root" apt-get update -qq </dev/null >"$work/bench-apt.log" 2>&1 \
        && in_rootfs "$root" apt-get install -y -qq --no-install-recommends openssh-server \
            </dev/null >>"$work/bench-apt.log" 2>&1 \
        || { tail -n 30 "$work/bench-apt.log" >&2; die "apt-get install openssh-server in the bench guest rootfs failed"; }
    rm -f "$root/usr/sbin/policy-rc.d"
    in_rootfs "$root" ssh-keygen -A </dev/null >/dev/null || die "ssh-keygen -A in the bench guest rootfs failed"
    slim "$root"
    [ -x "$root/usr/sbin/sshd" ] && ls "$root"/etc/ssh/ssh_host_ed25519_key >/dev/null \
        || die "the bench guest rootfs has no sshd or no host key"
    printf '%s\n' "$BENCH_INITTAB" >"$root/etc/inittab"
    mkdir -p "$root/etc/ssh/sshd_config.d"
    printf '%s\n' "$BENCH_SSHD_CONF" >"$root/etc/ssh/sshd_config.d/drover-bench.conf"
    install -d -m 0700 "$root/root/.ssh"
    install -m 0600 "$BENCH_KEY.pub" "$root/root/.ssh/authorized_keys"
    in_rootfs "$root" sh -c 'mkdir -p /run/sshd && /usr/sbin/sshd -t && rmdir /run/sshd' </dev/null || die "sshd -t in the bench guest rootfs: its configuration is refused"
}

# ensure_guest RECIPE LINK [bench]: RECIPE's files in the cache (built unless present) and the
# stable names LINK.{img,vmlinuz,initrd} pointing at them, replaced atomically (a test starting
# now sees the old or the new image).
ensure_guest() {
    local recipe=$1 name=$2 mode=${3:-} ext link changed=
    if [ -s "$CACHE/$recipe.img" ] && [ -s "$CACHE/$recipe.vmlinuz" ] && [ -s "$CACHE/$recipe.initrd" ]; then
        say "guest $recipe present"
    else
        build_guest "$recipe" "$mode"
        say "guest $recipe built ($built_how; $(du -m "$CACHE/$recipe.img" | cut -f1) MB used of 2G)"
    fi
    for ext in img vmlinuz initrd; do
        link=$CACHE/$name.$ext
        if [ "$(readlink "$link" 2>/dev/null)" != "$recipe.$ext" ]; then
            ln -sfn "$recipe.$ext" "$link.tmp" && mv -T "$link.tmp" "$link"
            changed+=" $name.$ext"
        fi
    done
    if [ -n "$changed" ]; then say "linked$changed -> $recipe.*"; else say "links $name.{img,vmlinuz,initrd} -> $recipe.*"; fi
}

ensure_guest "$RECIPE" libvirt-guest
if $BENCH; then ensure_guest "$BENCH_RECIPE" libvirt-bench-guest bench; fi

# ---------------------------------------------------------------------------------------------
# 5. Check, bounded: boot the guest once under TCG (never kvm: /dev/kvm here is PVM and cannot
#    run this kernel, backends.md) as a transient domain on a qcow2 overlay, wait for its ready
#    line on the serial console, say hello on its control channel, destroy it. User-mode
#    networking through QEMU pass-through, as the tests use it (nothing forwarded here). With
#    --bench, the bench guest too, with 127.0.0.1:<a free port> forwarded to its port 22, and
#    `ssh root@ true` with the bench key.
secs() { printf '%d.%02d' $(( $1 / 1000 )) $(( $1 % 1000 / 10 )); }

# check_guest NAME [ssh]: boots NAME.{img,vmlinuz,initrd} of the cache as above.
check_guest() {
    local name=$1 mode=${2:-} chk=$work/check-$1 channels= netdev=user,id=usernet0 port i ok rc out
    local start_ms created_ms ready_ms channel_ms ssh_ms sshed=
    mkdir -p "$chk"
    qemu-img create -q -f qcow2 -F raw -b "$CACHE/$name.img" "$chk/overlay.qcow2" </dev/null \
        || die "qemu-img create overlay on $CACHE/$name.img failed"
    for port in ctl out err; do
        channels+="    <channel type='unix'><source mode='bind' path='$chk/$port.sock'/><target type='virtio' name='org.drover.$port'/></channel>
"
    done
    port=
    if [ "$mode" = ssh ]; then
        # A port the kernel just gave out and took back: free unless something takes it now.
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
            || die "no free port on 127.0.0.1"
        netdev+=",hostfwd=tcp:127.0.0.1:$port-:22"
    fi
    cat >"$chk/domain.xml" <<EOF
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>$CHECK_DOMAIN</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$CACHE/$name.vmlinuz</kernel>
    <initrd>$CACHE/$name.initrd</initrd>
    <cmdline>console=ttyS0 root=/dev/vda rw</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$chk/overlay.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='$chk/console.log'/></serial>
    <console type='file'><source path='$chk/console.log'/><target type='serial'/></console>
$channels    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='$netdev'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=usernet0,bus=pci.0,addr=0x9'/>
  </qemu:commandline>
</domain>
EOF
    console_tail() { echo "--- last 30 lines of the guest's console ($chk/console.log):" >&2; tail -n 30 "$chk/console.log" >&2 2>/dev/null || true; }
    start_ms=$(now_ms)
    check_started=true
    out=$(timeout 120 "${VIRSH[@]}" create "$chk/domain.xml" </dev/null 2>&1) \
        || { printf '%s\n' "$out" >&2; die "virsh create $chk/domain.xml failed (output above)"; }
    created_ms=$(now_ms)
    ok=false
    for i in $(seq 450); do
        if grep -q 'drover test guest: ready' "$chk/console.log" 2>/dev/null; then ok=true; break; fi
        if [ $(( i % 10 )) = 0 ] && [ "$(timeout 10 "${VIRSH[@]}" domstate "$CHECK_DOMAIN" </dev/null 2>/dev/null)" != running ]; then
            console_tail; die "domain $CHECK_DOMAIN stopped before the guest was ready (QEMU log: /var/log/libvirt/qemu/$CHECK_DOMAIN.log)"
        fi
        sleep 0.2
    done
    $ok || { console_tail; die "no 'drover test guest: ready' on $CHECK_DOMAIN's console within 90 s"; }
    ready_ms=$(now_ms)
    # The agent's protocol: `hello NONCE` is answered `hello NONCE`. Never half-close our end
    # (QEMU then drops the whole connection, backends.md).
    rc=0
    out=$(timeout 20 python3 -c '
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b"hello 0123abcd\n")
deadline, buf = time.monotonic() + 10, b""
while b"\n" not in buf:
    left = deadline - time.monotonic()
    if left <= 0:
        sys.exit("no answer within 10 s, got %r" % buf)
    s.settimeout(left)
    try:
        chunk = s.recv(4096)
    except socket.timeout:
        continue
    if not chunk:
        sys.exit("connection closed, got %r" % buf)
    buf += chunk
print(buf.split(b"\n")[0].decode(errors="replace"))
' "$chk/ctl.sock" </dev/null 2>&1) || rc=$?
    channel_ms=$(now_ms)
    [ "$rc" = 0 ] && [ "$out" = "hello 0123abcd" ] \
        || { console_tail; die "org.drover.ctl: sent 'hello 0123abcd', got exit $rc, '$out' (want 'hello 0123abcd')"; }
    if [ "$mode" = ssh ]; then
        # sshd starts after the ready line: up to 60 tries, a second apart.
        ok=false
        for i in $(seq 60); do
            if out=$(timeout 20 ssh -i "$BENCH_KEY" -p "$port" -o BatchMode=yes -o ConnectTimeout=10 \
                    -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
                    root@127.0.0.1 'echo "$(id -un)@$(hostname)"' </dev/null 2>&1); then
                ok=true; break
            fi
            sleep 1
        done
        $ok || { console_tail; die "ssh root@127.0.0.1 -p $port (forwarded to the guest's port 22) failed for 60 s: $out"; }
        ssh_ms=$(now_ms)
        sshed=", ssh as $out $(secs $(( ssh_ms - channel_ms ))) s later"
    fi
    timeout 30 "${VIRSH[@]}" destroy "$CHECK_DOMAIN" </dev/null >/dev/null || die "virsh destroy $CHECK_DOMAIN failed"
    check_started=false
    say "checked $name: create $(secs $(( created_ms - start_ms ))) s, ready line $(secs $(( ready_ms - start_ms ))) s after start (TCG, 1 vCPU, 512 MiB), hello on org.drover.ctl answered in $(( channel_ms - ready_ms )) ms$sshed, destroyed"
}

check_guest libvirt-guest
if $BENCH; then check_guest libvirt-bench-guest ssh; fi

step_start=$t0
say "done"
