#!/usr/bin/env bash
# Installs what drover's tests need on a Debian machine (run as root) and runs them.
# Safe to run again on the same machine. The README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # setsid (util-linux) and ps (procps) are used by the tests, bash runs the scripts, and
    # the stand-in gitlab-runner (tests/harness/stand-in) archives with tar and uploads with curl;
    # git serves and fetches the repositories of run-job --repo.
    need=()
    for pkg in bash coreutils util-linux procps curl tar git; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
    done
    if [ "${#need[@]}" -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
fi

# Podman driver tests need podman, its Docker-compatible API socket and locally built images
# (no registry is reachable): tests/setup/podman.sh sets them up and is quick on a rerun. On a
# developer's machine its failure only makes the podman tests skip; in CI it fails the run, so
# a broken setup can never pass as skipped tests.
podman_sock=/run/podman/podman.sock
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! bash tests/setup/podman.sh </dev/null; then
        [ "${CI:-}" = true ] && { echo "tests/setup/podman.sh failed" >&2; exit 1; }
        echo "note: tests/setup/podman.sh failed (see above): podman tests will skip"
    fi
fi
# The LXD driver's tests need the LXD daemon and an imported test image: tests/setup/lxd.sh,
# the same way (quick on a rerun; fatal in CI, a skip elsewhere).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! bash tests/setup/lxd.sh </dev/null; then
        [ "${CI:-}" = true ] && { echo "tests/setup/lxd.sh failed" >&2; exit 1; }
        echo "note: tests/setup/lxd.sh failed (see above): LXD tests will skip"
    fi
fi

if [ -n "${DROVER_PODMAN_SOCKET:-}" ]; then
    :   # the caller chose a socket; keep it
elif curl -sf --max-time 2 --unix-socket "$podman_sock" http://d/_ping >/dev/null 2>&1; then
    export DROVER_PODMAN_SOCKET=$podman_sock
else
    echo "note: no podman API on $podman_sock (needs root and apt-get to set up): podman tests will skip"
fi

# Real-runner tests need a GitLab Runner binary; without one they skip with one line.
if [ -z "${GITLAB_RUNNER_BIN:-}" ] && ! command -v gitlab-runner >/dev/null; then
    echo "note: no GITLAB_RUNNER_BIN and no gitlab-runner on PATH: real-runner tests will skip"
fi

cargo test --workspace --no-fail-fast
