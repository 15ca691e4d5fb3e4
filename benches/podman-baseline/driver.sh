#!/usr/bin/env bash
# The baseline of drivers/podman/benches/stages.rs: a GitLab Runner custom-executor driver that
# does what the widely copied podman driver scripts do, and nothing more.
#
#   driver.sh config                  prints the builds and cache dirs (not measured)
#   driver.sh prepare                 podman run -d a keepalive container named after the job
#   driver.sh run <script> <stage>    podman exec -i <container> bash < <script>
#   driver.sh cleanup                 podman rm -f <container>
#
# The container name comes from the job's CI_PROJECT_ID and CI_JOB_ID, which the runner exports
# as CUSTOM_ENV_*. Environment: BASELINE_IMAGE (default localhost/drover-test/debian:bookworm).
set -o errexit -o nounset -o pipefail

image=${BASELINE_IMAGE:-localhost/drover-test/debian:bookworm}
container="baseline-project-${CUSTOM_ENV_CI_PROJECT_ID:-0}-job-${CUSTOM_ENV_CI_JOB_ID:?CUSTOM_ENV_CI_JOB_ID is not set}"
build_failure=${BUILD_FAILURE_EXIT_CODE:-1}
system_failure=${SYSTEM_FAILURE_EXIT_CODE:-2}

case "${1:-}" in
config)
    echo '{"builds_dir":"/builds","cache_dir":"/cache"}'
    ;;
prepare)
    # A container left by an earlier attempt of the same job would make `podman run` fail.
    podman rm -f "$container" >/dev/null 2>&1 || true
    if ! podman run -d --name "$container" --network none "$image" sleep infinity >/dev/null; then
        echo "baseline: could not start $container" >&2
        exit "$system_failure"
    fi
    ;;
run)
    script=${2:?usage: driver.sh run <script> <stage>}
    status=0
    podman exec -i "$container" bash <"$script" || status=$?
    if [ "$status" -ne 0 ]; then
        if [ -n "${BUILD_EXIT_CODE_FILE:-}" ]; then
            echo "$status" >"$BUILD_EXIT_CODE_FILE"
        fi
        exit "$build_failure"
    fi
    ;;
cleanup)
    podman rm -f "$container" >/dev/null 2>&1 || true
    ;;
*)
    echo "usage: driver.sh config|prepare|run <script> <stage>|cleanup" >&2
    exit "$system_failure"
    ;;
esac
