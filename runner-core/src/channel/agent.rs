//! The stage agent: the part of the channel that runs inside the job environment.
//!
//! It is a POSIX `sh` program, because `sh` is all a job image is sure to have (dash, bash and
//! busybox's ash all run it; the channel's tests run it under each). It has three modes, each
//! started as `sh -c AGENT drover-agent MODE ARGS...`:
//!
//! - `serve DIR SHELL`: the long-lived agent of a [`super::SharedDir`]. It reads orders, one
//!   line each, from the FIFO `DIR/wake`: `run NONCE` runs `DIR/NONCE.sh` with its output on
//!   the FIFOs `DIR/NONCE.out` and `DIR/NONCE.err`, and holds `DIR/NONCE.alive` open while it
//!   waits for the script (the script does not inherit it), so the driver sees at once when
//!   the waiter is killed; `signal TERM|KILL PGID` signals a stage's process group. A stage
//!   runs in a subshell of its own, so the loop is free to take a signal order while a script
//!   runs, and a killed loop does not take the running stage with it. Where the agent is the
//!   environment's first process it inherits every orphan of the job, and `jobs` reaps those
//!   that ended (and its own ended stages) at each order. Without `DIR/wake` (an engine that
//!   does not see the host's directory) it only keeps the environment alive, and the driver
//!   runs every stage as an exec instead.
//! - `stage NONCE SHELL -`: one stage, for transports that start a process per stage (an exec,
//!   an SSH channel): the script comes on stdin and the output goes to stdout and stderr. The
//!   script is kept in a file named after the nonce, made new (never an existing one) and
//!   private, by the shell itself rather than `mktemp`: a stage costs one program less.
//! - `signal TERM|KILL PGID`: signals a stage's process group, for the same transports.
//!
//! Sourced (or evaluated) with any other first argument it only defines its functions: a guest agent that
//! already holds the script in a file may call `stage NONCE SHELL FILE` itself (drover-libvirt's
//! does, saving the processes of the `stage` mode).
//!
//! Every stage writes the same frame on both of its output streams, whatever carries them:
//! `\x1edrover-NONCE start PGID\n` before the script's first byte, the script's bytes as they
//! come, and `\x1edrover-NONCE exit STATUS\n` after the script has exited (see `wire`). The
//! start line is printed by the new session's leader just before it `exec`s the job's shell,
//! so PGID is the script's process group and nothing of the script can come before it. The
//! exit line is printed by the stage's waiter, which is outside that group: signalling the
//! group stops the script but never the report of its status.

/// The agent, for `sh -c`.
pub const AGENT: &str = r#"stage() {
  setsid sh -c 'printf "\036drover-%s start %s\n" "$0" "$$"; printf "\036drover-%s start %s\n" "$0" "$$" >&2; exec "$1" "$2"' "$1" "$2" "$3" </dev/null 4>&- &
  wait $!
  s=$?
  printf '\036drover-%s exit %s\n' "$1" "$s"
  printf '\036drover-%s exit %s\n' "$1" "$s" >&2
}
valid_signal() {
  case $1 in TERM|KILL) ;; *) return 1 ;; esac
  case $2 in ''|*[!0-9]*|0|1) return 1 ;; esac
}
case $1 in
serve)
  io=$2 shell=$3
  if [ ! -p "$io/wake" ]; then
    trap 'exit 0' TERM
    while :; do sleep 3600 & wait $!; done
  fi
  exec 3<>"$io/wake" </dev/null
  while read -r verb a b <&3; do
    jobs >/dev/null
    case $verb in
    run)
      case $a in ''|*[!0-9a-f]*) continue ;; esac
      ( stage "$a" "$shell" "$io/$a.sh" ) 3<&- >"$io/$a.out" 2>"$io/$a.err" 4>"$io/$a.alive" &
      ;;
    signal)
      valid_signal "$a" "$b" && kill -s "$a" -- "-$b" 2>/dev/null
      ;;
    esac
  done
  ;;
stage)
  f=${TMPDIR:-/tmp}/drover-stage-$2-$$
  (umask 077; set -C; exec cat >"$f") || exit 1
  stage "$2" "$3" "$f"
  rm -f "$f"
  ;;
signal)
  valid_signal "$2" "$3" && kill -s "$2" -- "-$3" 2>/dev/null
  true
  ;;
esac"#;

/// `$0` of every agent process, so an operator (or a test) can find them with `ps`.
pub const AGENT_NAME: &str = "drover-agent";

fn agent(args: &[&str]) -> Vec<String> {
    ["sh", "-c", AGENT, AGENT_NAME]
        .iter()
        .chain(args)
        .map(|arg| (*arg).to_owned())
        .collect()
}

/// The long-lived agent of a shared directory mounted at `dir`, for a container's entrypoint
/// (it is then PID 1) or for [`launch_argv`].
pub fn serve_argv(dir: &str, shell: &str) -> Vec<String> {
    agent(&["serve", dir, shell])
}

/// A command that starts the agent of `dir` in a session of its own and returns at once: its
/// stdio goes to `/dev/null`, so the exec that starts it ends without waiting for it.
pub fn launch_argv(dir: &str, shell: &str) -> Vec<String> {
    let launcher = format!(
        "setsid sh -c \"$0\" {AGENT_NAME} serve \"$1\" \"$2\" </dev/null >/dev/null 2>&1 &"
    );
    vec![
        "sh".into(),
        "-c".into(),
        launcher,
        AGENT.into(),
        dir.into(),
        shell.into(),
    ]
}

/// One stage whose script comes on stdin (an exec or an SSH channel per stage).
pub fn stage_argv(nonce: &str, shell: &str) -> Vec<String> {
    agent(&["stage", nonce, shell, "-"])
}

/// Sends `signal` to the process group `pgid`.
pub fn signal_argv(signal: &str, pgid: u32) -> Vec<String> {
    agent(&["signal", signal, &pgid.to_string()])
}
