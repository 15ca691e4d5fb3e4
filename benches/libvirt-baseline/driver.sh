#!/usr/bin/env bash
# The baseline of drivers/libvirt/benches/stages.rs: a GitLab Runner custom-executor driver that
# does what GitLab's documented libvirt example driver does (prepare, run and cleanup scripts
# around qemu-img, virsh and ssh), and nothing more.
#
#   driver.sh config                  prints the builds and cache dirs (not measured)
#   driver.sh prepare                 qemu-img create a qcow2 overlay of the base disk, virsh define
#                                     and virsh start a domain on it, then wait until
#                                     `ssh root@... true` works
#   driver.sh run <script> <stage>    a new ssh connection per stage: ssh ... /bin/bash < <script>
#   driver.sh cleanup                 virsh destroy, virsh undefine, remove the overlay
#
# The domain (`baseline-libvirt-job-<id>`, the id from CUSTOM_ENV_CI_JOB_ID) boots like
# drover-libvirt's VMs: the same guest, vCPUs, memory and direct kernel boot. The example gives
# its VM libvirt's default network and polls `virsh domifaddr` for the DHCP lease, then ssh; here
# the guest has QEMU's user-mode networking (as drover-libvirt's), which hands out no lease to
# ask for, so sshd is reached through a forward from 127.0.0.1:<20000 + id % 20000> to the
# guest's port 22 (QEMU command-line pass-through), and the wait is for ssh answering. The
# example polls once a second; here every 0.1 s, bounded at 120 s, so the wait does not count
# against the baseline. Host-key checking is off as in the example, so ssh warns on stderr that
# it added the host key, once per connection, as the example's does.
#
# Environment (defaults: tests/setup/libvirt.sh --bench): BASELINE_DISK (raw base disk),
# BASELINE_KERNEL, BASELINE_INITRD, BASELINE_KEY (the private key root's authorized_keys
# accepts), BASELINE_DIR (overlays and console logs, default /var/lib/libvirt/images),
# BASELINE_DOMAIN_TYPE (default qemu: TCG), BASELINE_VCPUS (1), BASELINE_MEMORY_MIB (512).
set -o errexit -o nounset -o pipefail

images=/var/cache/drover/images
disk=${BASELINE_DISK:-$images/libvirt-bench-guest.img}
kernel=${BASELINE_KERNEL:-$images/libvirt-bench-guest.vmlinuz}
initrd=${BASELINE_INITRD:-$images/libvirt-bench-guest.initrd}
key=${BASELINE_KEY:-/var/cache/drover/bench-ssh/id_ed25519}
dir=${BASELINE_DIR:-/var/lib/libvirt/images}
domain_type=${BASELINE_DOMAIN_TYPE:-qemu}
vcpus=${BASELINE_VCPUS:-1}
memory_mib=${BASELINE_MEMORY_MIB:-512}
build_failure=${BUILD_FAILURE_EXIT_CODE:-1}
system_failure=${SYSTEM_FAILURE_EXIT_CODE:-2}
virsh=(virsh -q -c qemu:///system)

# remove: the job's domain and files, whatever is left of them.
remove() {
    "${virsh[@]}" destroy "$domain" >/dev/null 2>&1 || true
    "${virsh[@]}" undefine "$domain" >/dev/null 2>&1 || true
    rm -f "$overlay" "$console"
}

if [ "${1:-}" = config ]; then
    echo '{"builds_dir":"/builds","cache_dir":"/cache"}'
    exit 0
fi
# The job id, as the example's domain names use it (the runner exports the job's variables as
# CUSTOM_ENV_*).
id=${CUSTOM_ENV_CI_JOB_ID:-}
case "$id" in
'' | *[!0-9]*)
    echo "baseline: CUSTOM_ENV_CI_JOB_ID is not a job id: '$id'" >&2
    exit "$system_failure"
    ;;
esac
domain=baseline-libvirt-job-$id
overlay=$dir/$domain.qcow2
console=$dir/$domain.console.log
port=$((20000 + 10#$id % 20000))
# ssh to the job's guest as root, host-key checking off as in the example.
ssh_options=(-i "$key" -p "$port" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null)

case "${1:-}" in
prepare)
    # A domain left by an earlier attempt of the same job would make `virsh start` fail.
    if "${virsh[@]}" domstate "$domain" >/dev/null 2>&1; then
        remove
    fi
    if ! qemu-img create -q -f qcow2 -F raw -b "$disk" "$overlay" </dev/null; then
        echo "baseline: could not make the overlay $overlay of $disk" >&2
        exit "$system_failure"
    fi
    if ! "${virsh[@]}" define /dev/stdin >/dev/null <<EOF; then
<domain type='$domain_type' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>$domain</name>
  <memory unit='MiB'>$memory_mib</memory>
  <vcpu>$vcpus</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$kernel</kernel>
    <initrd>$initrd</initrd>
    <cmdline>console=ttyS0 root=/dev/vda rw</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$overlay'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'><log file='$console' append='off'/><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=baseline0,hostfwd=tcp:127.0.0.1:$port-:22'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=baseline0,bus=pci.0,addr=0x9'/>
  </qemu:commandline>
</domain>
EOF
        echo "baseline: could not define $domain" >&2
        remove
        exit "$system_failure"
    fi
    if ! "${virsh[@]}" start "$domain" >/dev/null; then
        echo "baseline: could not start $domain" >&2
        remove
        exit "$system_failure"
    fi
    # Until sshd answers: before the guest's network is up, QEMU accepts the connection on the
    # host and holds it, so each try is bounded too (ConnectTimeout covers the banner).
    deadline=$((SECONDS + 120))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if timeout 10 ssh "${ssh_options[@]}" -o ConnectTimeout=2 root@127.0.0.1 true \
            </dev/null >/dev/null 2>&1; then
            exit 0
        fi
        sleep 0.1
    done
    echo "baseline: $domain did not accept ssh on 127.0.0.1:$port within 120 s" >&2
    exit "$system_failure"
    ;;
run)
    script=${2:?usage: driver.sh run <script> <stage>}
    status=0
    ssh "${ssh_options[@]}" root@127.0.0.1 /bin/bash <"$script" || status=$?
    if [ "$status" -ne 0 ]; then
        if [ -n "${BUILD_EXIT_CODE_FILE:-}" ]; then
            echo "$status" >"$BUILD_EXIT_CODE_FILE"
        fi
        exit "$build_failure"
    fi
    ;;
cleanup)
    remove
    ;;
*)
    echo "usage: driver.sh config|prepare|run <script> <stage>|cleanup" >&2
    exit "$system_failure"
    ;;
esac
