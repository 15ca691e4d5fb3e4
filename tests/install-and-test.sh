#!/usr/bin/env bash
# Installs what drover's tests need on a Debian machine (run as root) and runs them.
# Safe to run again on the same machine. The README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # setsid (util-linux) and ps (procps) are used by the tests, bash runs the scripts, and
    # the stand-in gitlab-runner (tests/harness/stand-in) archives with tar and uploads with curl.
    need=()
    for pkg in bash coreutils util-linux procps curl tar; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
    done
    if [ "${#need[@]}" -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
fi

# Real-runner tests need a GitLab Runner binary; without one they skip with one line.
if [ -z "${GITLAB_RUNNER_BIN:-}" ] && ! command -v gitlab-runner >/dev/null; then
    echo "note: no GITLAB_RUNNER_BIN and no gitlab-runner on PATH: real-runner tests will skip"
fi

cargo test --workspace --no-fail-fast
