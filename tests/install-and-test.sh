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

# Backend tests need their backends: podman with its Docker-compatible API socket, Docker Engine
# (the podman driver's tests run against both), the LXD daemon, and locally built test images (no
# registry is reachable). Each tests/setup/*.sh sets one up and is quick on a rerun. Where it
# fails, that backend's tests skip with one line on a developer's machine; in CI the run fails
# here, and .ci/run's DROVER_REQUIRE also makes any skipped backend test a failure.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    for backend in podman docker lxd libvirt ec2; do
        if ! bash "tests/setup/$backend.sh" </dev/null; then
            [ "${CI:-}" = true ] && { echo "tests/setup/$backend.sh failed" >&2; exit 1; }
            echo "note: tests/setup/$backend.sh failed (see above): $backend tests will skip"
        fi
    done
else
    echo "note: not root on Debian: backends are not set up; tests of missing backends skip"
fi

# Real-runner tests need a GitLab Runner binary; without one they skip with one line.
if [ -z "${GITLAB_RUNNER_BIN:-}" ] && ! command -v gitlab-runner >/dev/null; then
    echo "note: no GITLAB_RUNNER_BIN and no gitlab-runner on PATH: real-runner tests will skip"
fi

# Four tests at a time in each test binary, whatever the cores: the backend tests spend their
# time waiting on daemons (a full run uses under a minute of CPU in seven), not computing.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"
cargo test --workspace --no-fail-fast
