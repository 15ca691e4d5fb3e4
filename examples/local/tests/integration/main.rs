//! drover-local as GitLab Runner calls it: through the emulated runner (`drover` CLI and the
//! harness library), and through a real `gitlab-runner` when one is given.

mod local;
mod pipeline;
mod real_runner;
mod util;
