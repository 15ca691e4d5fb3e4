#!/usr/bin/env bash
# Sets up what drover-ec2's tests stand in for AWS with, on a Debian 12 machine of the project's
# kind (run as root). CI has no AWS account: the tests talk to moto (a local fake of the EC2 API)
# and "boot" every instance moto launches as an isolated environment on this host with its own
# sshd on 127.0.0.1 (drivers/ec2/tests/cloud/mod.rs). Idempotent: a second run changes nothing
# and takes well under a second.
#
# Result:
#   - /usr/sbin/sshd, ssh and ssh-keygen (openssh-server, openssh-client), and no system sshd
#     left running on port 22 because of this script: each test instance starts its own;
#   - unshare and setpriv (util-linux), which build and guard those environments;
#   - moto 5.2.5 with its server in a venv: /var/cache/drover/moto/bin/moto_server. Nothing is
#     started: each test starts its own moto_server on a free loopback port.
set -euo pipefail

MOTO_VERSION=5.2.5
MOTO_VENV=/var/cache/drover/moto
# The system Python, whatever a developer's PATH says (pyenv shims, a conda base...): the venv
# must outlive the developer's environment and be the same in CI.
PYTHON=/usr/bin/python3

SETUP_NAME="ec2 setup"
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_root_debian "installs packages into the system and a venv into /var/cache/drover"

mkdir -p /var/cache/drover
work=
own_policy=
cleanup() {
    [ -z "$work" ] || rm -rf "$work"
    # A policy-rc.d this script put in place for its install only (step 1), however it exits.
    [ -z "$own_policy" ] || rm -f "$own_policy"
}
trap cleanup EXIT

# Two runs at once (CI plus a developer) would race on apt and on the venv: serialise them,
# with a bounded wait.
exec 9>/var/cache/drover/ec2-setup.lock
flock -w 900 9 || die "another tests/setup/ec2.sh has held /var/cache/drover/ec2-setup.lock for 15 min"
[ $(( $(now_ms) - step_start )) -lt 1000 ] || say "waited for another run's lock"

# sshd_pids: the pids of running /usr/sbin/sshd processes, one a line (none: empty). From /proc,
# so that it needs neither procps nor iproute2.
sshd_pids() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" != /usr/sbin/sshd ] || echo "${p#/proc/}"
    done
}

# ---------------------------------------------------------------------------------------------
# 1. OpenSSH. Only when sshd is missing: installing openssh-server runs its postinst, which
#    makes the host's own host keys (harmless; instances never see them) and asks invoke-rc.d to
#    start the system sshd on port 22. A policy-rc.d that forbids starting services (exit 101)
#    already exists on this project's machines; where none does, one is put in place for the
#    install only. Whatever happens, an sshd on port 22 that was not there before is stopped.
if [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null && command -v ssh-keygen >/dev/null; then
    say "openssh present ($(/usr/sbin/sshd -V 2>&1 | head -n 1 | cut -d, -f1))"
else
    before=$(sshd_pids)
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# tests/setup/ec2.sh: no service starts during its install\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        own_policy=/usr/sbin/policy-rc.d
    fi
    ensure_packages --no-recommends openssh-server openssh-client
    [ -z "$own_policy" ] || rm -f "$own_policy"
    own_policy=
    # An sshd not on the list from before is one the postinst started (an operator's own sshd,
    # if any, is left alone). SIGTERM: the listener takes its children with it.
    stopped=
    for pid in $(sshd_pids); do
        if ! grep -qx "$pid" <<<"$before"; then
            kill "$pid" 2>/dev/null && stopped="$stopped $pid"
        fi
    done
    [ -x /usr/sbin/sshd ] || die "openssh-server is installed but /usr/sbin/sshd is missing"
    [ -z "$stopped" ] || say "stopped the sshd its postinst started (pid$stopped)"
fi
if command -v ss >/dev/null && [ -n "$(ss -Hltn 'sport = :22' 2>/dev/null)" ]; then
    say "note: something listens on port 22 (not started by this script; left alone: the tests do not use it)"
fi

# ---------------------------------------------------------------------------------------------
# 2. unshare (the instances' namespaces) and setpriv (--pdeathsig: an instance or moto dies
#    with the test process that started it, even a killed one): both in util-linux.
if command -v unshare >/dev/null && command -v setpriv >/dev/null; then
    say "unshare and setpriv present"
else
    ensure_packages --no-recommends util-linux
fi

# ---------------------------------------------------------------------------------------------
# 3. moto in its own venv, pinned: the tests rely on its EC2 behaviour (default VPC and subnets,
#    fake AMIs, instance states). A venv cannot be moved once made (its scripts carry its path),
#    so it is made in place, and a marker written last says the install finished: a killed run
#    leaves no marker, and the next run starts the venv afresh instead of trusting a moto_server
#    whose dependencies are half installed. A marker of another version is a recipe change.
MARKER=$MOTO_VENV/.drover-installed
want_marker="moto[server]==$MOTO_VERSION"
if [ -x "$MOTO_VENV/bin/moto_server" ] && [ "$(cat "$MARKER" 2>/dev/null)" = "$want_marker" ]; then
    say "moto present ($want_marker in $MOTO_VENV)"
else
    # `python3 -m venv` needs ensurepip's wheels, which Debian ships in python3-venv.
    ensure_packages --no-recommends python3 python3-venv
    work=$(mktemp -d /var/cache/drover/.moto-setup.XXXXXX)
    rm -rf "$MOTO_VENV"
    "$PYTHON" -m venv "$MOTO_VENV" >"$work/venv.log" 2>&1 \
        || { cat "$work/venv.log" >&2; rm -rf "$MOTO_VENV"; die "$PYTHON -m venv $MOTO_VENV failed (output above)"; }
    timeout 900 "$MOTO_VENV/bin/pip" install --no-input -q "$want_marker" </dev/null >"$work/pip.log" 2>&1 \
        || { tail -n 30 "$work/pip.log" >&2; rm -rf "$MOTO_VENV"; die "pip install $want_marker failed (output above)"; }
    [ -x "$MOTO_VENV/bin/moto_server" ] || { rm -rf "$MOTO_VENV"; die "moto installed but $MOTO_VENV/bin/moto_server is missing"; }
    echo "$want_marker" >"$MARKER"
    say "installed $want_marker in $MOTO_VENV"
fi

step_start=$t0
say "done"
