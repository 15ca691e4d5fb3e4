#!/usr/bin/env bash
# The baseline of drivers/lxd/benches/stages.rs: a GitLab Runner custom-executor driver that does
# what GitLab's documented LXD example driver does (prepare.sh, run.sh, cleanup.sh), and nothing
# more.
#
#   driver.sh config                  prints the builds and cache dirs (not measured)
#   driver.sh prepare                 lxc launch the image, then wait until `lxc exec -- true` works
#   driver.sh run <script> <stage>    lxc exec <instance> -- /bin/bash < <script>
#   driver.sh cleanup                 lxc delete -f <instance>
#
# The instance name comes from the job id in $JOB_RESPONSE_FILE. The documented example polls
# readiness once a second; here the poll is every 0.1 s (as drover-lxd's), bounded at 60 s, so
# the wait does not count against the baseline. Environment: BASELINE_IMAGE (default
# drover-test/debian).
set -o errexit -o nounset -o pipefail

image=${BASELINE_IMAGE:-drover-test/debian}
build_failure=${BUILD_FAILURE_EXIT_CODE:-1}
system_failure=${SYSTEM_FAILURE_EXIT_CODE:-2}

job_id() {
    local id
    id=$(sed -n 's/^[^"]*"id": *\([0-9][0-9]*\).*/\1/p' "${JOB_RESPONSE_FILE:?JOB_RESPONSE_FILE is not set}" | head -n 1)
    if [ -z "$id" ]; then
        echo "baseline: no job id in $JOB_RESPONSE_FILE" >&2
        exit "$system_failure"
    fi
    echo "$id"
}

case "${1:-}" in
config)
    echo '{"builds_dir":"/builds","cache_dir":"/cache"}'
    ;;
prepare)
    instance="baseline-lxd-job-$(job_id)"
    # An instance left by an earlier attempt of the same job would make `lxc launch` fail.
    if lxc info "$instance" >/dev/null 2>&1; then
        lxc delete -f "$instance" >/dev/null 2>&1 || true
    fi
    if ! lxc launch "$image" "$instance" >/dev/null; then
        echo "baseline: could not launch $instance" >&2
        exit "$system_failure"
    fi
    for _ in $(seq 1 600); do
        if lxc exec "$instance" -- true >/dev/null 2>&1; then
            exit 0
        fi
        sleep 0.1
    done
    echo "baseline: $instance did not accept commands within 60 s" >&2
    exit "$system_failure"
    ;;
run)
    script=${2:?usage: driver.sh run <script> <stage>}
    instance="baseline-lxd-job-$(job_id)"
    status=0
    lxc exec "$instance" -- /bin/bash <"$script" || status=$?
    if [ "$status" -ne 0 ]; then
        if [ -n "${BUILD_EXIT_CODE_FILE:-}" ]; then
            echo "$status" >"$BUILD_EXIT_CODE_FILE"
        fi
        exit "$build_failure"
    fi
    ;;
cleanup)
    instance="baseline-lxd-job-$(job_id)"
    lxc delete -f "$instance" >/dev/null 2>&1 || true
    ;;
*)
    echo "usage: driver.sh config|prepare|run <script> <stage>|cleanup" >&2
    exit "$system_failure"
    ;;
esac
