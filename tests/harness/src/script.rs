//! The bash scripts GitLab Runner hands to `run_exec`, one per sub-stage (contract §4.1, §4.3).
//!
//! The shape follows the runner's bash shell from v19.1 on (`shells/bash.go` `Finish`): the
//! shebang, `trap 'exit 1' TERM`, pipefail detection, errexit, `set +o noclobber`, then the
//! stage body as one quoted string `eval`ed in a subshell with stdin from `/dev/null`, then
//! `exit 0`. The bodies follow `shells/abstract.go`.

use drover_protocol::{GitInfo, JobStep, JobVariable, SubStage};
use serde::Deserialize;

const ANSI_BOLD_GREEN: &str = "\x1b[32;1m";
const ANSI_YELLOW: &str = "\x1b[0;33m";
const ANSI_RESET: &str = "\x1b[0;m";
/// The runner's bash trap: SIGTERM to the script's shell becomes `exit 1` (§4.3 item 2).
const TERM_TRAP: &str = "trap 'exit 1' TERM";
/// The dotenv file jobs append to (`GITLAB_ENV`).
const GITLAB_ENV_FILE: &str = "gitlab_runner_env";
/// The binary every cache and artifact command calls inside the environment (§8).
const RUNNER_COMMAND: &str = "gitlab-runner";
/// `--timeout` of cache commands in minutes: the runner's default cache request timeout.
const CACHE_REQUEST_TIMEOUT_MIN: u32 = 10;

/// One `cache` entry of the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CacheEntry {
    /// The key (already expanded).
    #[serde(default)]
    pub key: String,
    /// Paths to archive.
    #[serde(default)]
    pub paths: Vec<String>,
    /// `on_success`, `on_failure` or `always`.
    #[serde(default)]
    pub when: String,
}

/// One `artifacts` entry of the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ArtifactEntry {
    /// Paths to upload.
    #[serde(default)]
    pub paths: Vec<String>,
    /// `on_success`, `on_failure` or `always`.
    #[serde(default)]
    pub when: String,
}

/// A job whose artifacts this job downloads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dependency {
    /// Its job id.
    pub id: u64,
    /// Its job name.
    pub name: String,
    /// Its job token.
    pub token: String,
}

/// Everything script generation needs: the runner's `ShellScriptInfo`, reduced.
#[derive(Debug, Clone, Default)]
pub struct ScriptInfo {
    /// `bash` or `sh`: the shebang's interpreter.
    pub shell: String,
    /// Every job variable in `GetAllVariables` order (§3.4); all are exported (§4.3).
    pub variables: Vec<JobVariable>,
    /// `CI_PROJECT_DIR`, a path inside the job environment.
    pub project_dir: String,
    /// The project's cache directory `<cache_dir>/<namespace>/<project>` (§8).
    pub cache_project_dir: String,
    /// config_exec's `hostname`, for the prepare_script banner.
    pub hostname: Option<String>,
    /// `GIT_STRATEGY`.
    pub git_strategy: String,
    /// `git_info` of the payload: where and what to fetch.
    pub git: GitInfo,
    /// The payload's steps.
    pub steps: Vec<JobStep>,
    /// The payload's cache entries.
    pub cache: Vec<CacheEntry>,
    /// The payload's artifacts entries.
    pub artifacts: Vec<ArtifactEntry>,
    /// Jobs with artifacts to download.
    pub dependencies: Vec<Dependency>,
    /// The runner's `url`; artifact stages are skipped when it is empty (§4.1 row 8).
    pub server_url: String,
    /// The job token (for `artifacts-uploader`).
    pub job_token: String,
    /// The job id.
    pub job_id: u64,
}

impl ScriptInfo {
    /// `<CI_PROJECT_DIR>.tmp`, where file variables and the dotenv file live.
    pub fn tmp_project_dir(&self) -> String {
        format!("{}.tmp", self.project_dir)
    }

    fn tmp_file(&self, name: &str) -> String {
        format!("{}/{name}", self.tmp_project_dir())
    }
}

/// Quotes `text` for bash the way the runner's `ShellEscape` does: bare when it only has
/// harmless characters, otherwise an ANSI-C `$'...'` string with control bytes as escapes.
pub fn shell_escape(text: &str) -> String {
    if text.is_empty() {
        return "''".into();
    }
    let mut quoted = false;
    let mut out = String::with_capacity(text.len() + 3);
    for c in text.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | ',' | '-' | '.' | '/' | '@' | '_' => out.push(c),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\x0b' => out.push_str("\\v"),
            '\x0c' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
        quoted |=
            !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | ',' | '-' | '.' | '/' | '@' | '_');
    }
    if quoted { format!("$'{out}'") } else { out }
}

/// Go's `%q` for the plain paths the runner formats with it.
fn double_quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Builds a stage body line by line, like the runner's `BashWriter`.
#[derive(Default)]
struct Writer {
    body: String,
    indent: usize,
}

impl Writer {
    fn line(&mut self, text: &str) {
        for _ in 0..self.indent {
            self.body.push_str("  ");
        }
        self.body.push_str(text);
        self.body.push('\n');
    }

    fn command(&mut self, words: &[&str]) {
        let line: Vec<String> = words.iter().map(|w| shell_escape(w)).collect();
        self.line(&line.join(" "));
    }

    fn colored(&mut self, color: &str, text: &str) {
        self.line(&format!(
            "echo {}",
            shell_escape(&format!("{color}{text}{ANSI_RESET}"))
        ));
    }

    fn notice(&mut self, text: &str) {
        self.colored(ANSI_BOLD_GREEN, text);
    }

    fn warning(&mut self, text: &str) {
        self.colored(ANSI_YELLOW, text);
    }

    fn if_cmd(&mut self, words: &[&str], quiet: bool) {
        let line: Vec<String> = words.iter().map(|w| shell_escape(w)).collect();
        let redirect = if quiet { " >/dev/null 2>&1" } else { "" };
        self.line(&format!("if {}{redirect} ; then", line.join(" ")));
        self.indent += 1;
    }

    fn else_(&mut self) {
        self.indent -= 1;
        self.line("else");
        self.indent += 1;
    }

    fn end_if(&mut self) {
        self.indent -= 1;
        self.line("fi");
    }

    fn rm_file(&mut self, path: &str) {
        self.line(&format!("rm -f {}", double_quote(path)));
    }

    /// `guardRunnerCommand` (§8): a missing `gitlab-runner` only prints a warning.
    fn guard_runner_command(&mut self, action: &str, body: impl FnOnce(&mut Writer)) {
        self.if_cmd(&[RUNNER_COMMAND, "--version"], true);
        body(self);
        self.else_();
        self.warning(&format!("Missing {RUNNER_COMMAND}. {action} is disabled."));
        self.end_if();
    }
}

/// Generates the script for `stage`, or `None` when the runner would skip the stage and call
/// no driver at all (§4.1, "Skipped").
pub fn generate(info: &ScriptInfo, stage: &SubStage) -> Option<String> {
    let mut w = Writer::default();
    match stage {
        SubStage::PrepareScript => prepare_script(info, &mut w),
        SubStage::GetSources => get_sources(info, &mut w),
        SubStage::ClearWorktree => clear_worktree(info, &mut w),
        SubStage::RestoreCache => restore_cache(info, &mut w)?,
        SubStage::DownloadArtifacts => download_artifacts(info, &mut w)?,
        SubStage::AfterScript => user_step(info, &mut w, "after_script", true)?,
        SubStage::ArchiveCache => archive_cache(info, &mut w, true)?,
        SubStage::ArchiveCacheOnFailure => archive_cache(info, &mut w, false)?,
        SubStage::UploadArtifactsOnSuccess => upload_artifacts(info, &mut w, true)?,
        SubStage::UploadArtifactsOnFailure => upload_artifacts(info, &mut w, false)?,
        SubStage::CleanupFileVariables => cleanup_file_variables(info, &mut w),
        SubStage::BuildScript => user_step(info, &mut w, "script", false)?,
        SubStage::Step(name) | SubStage::Other(name) => user_step(
            info,
            &mut w,
            name.strip_prefix("step_").unwrap_or(name),
            false,
        )?,
    }
    Some(finish(info, stage, &w.body))
}

/// `BashWriter.Finish` (§4.3).
fn finish(info: &ScriptInfo, stage: &SubStage, body: &str) -> String {
    let shell = if info.shell.is_empty() {
        "bash"
    } else {
        &info.shell
    };
    let mut script = format!("#!/usr/bin/env {shell}\n\n{TERM_TRAP}\n\n");
    script
        .push_str("case \"$(set -o)\" in *\"pipefail\"*) set -o pipefail;; esac; set -o errexit\n");
    script.push_str("set +o noclobber\n");
    // The banner is written before the body, outside the quoted string
    // (`ensurePrepareStageHostnameMessage`), so `$(hostname)` expands when the body runs.
    let mut full_body = String::new();
    if *stage == SubStage::PrepareScript {
        let banner = match &info.hostname {
            Some(host) if !host.is_empty() => format!("Running on $(hostname) via {host}..."),
            _ => "Running on $(hostname)...".into(),
        };
        full_body.push_str(&format!("echo {}\n", double_quote(&banner)));
    }
    full_body.push_str(body);
    script.push_str(&format!(
        "({TERM_TRAP}; eval {}) < /dev/null\n",
        shell_escape(&full_body)
    ));
    script.push_str("exit 0\n");
    script
}

/// `writeExports` (§4.3): every variable, file variables written to `<project>.tmp/<KEY>`,
/// then `GITLAB_ENV` and the dotenv file. With `env_only` file variables are not rewritten.
fn exports(info: &ScriptInfo, w: &mut Writer, env_only: bool) {
    let tmp = info.tmp_project_dir();
    for variable in &info.variables {
        if variable.file && !env_only {
            let path = info.tmp_file(&variable.key);
            w.line(&format!("mkdir -p {}", double_quote(&tmp)));
            w.line(&format!(
                "printf '%s' {} > {}",
                shell_escape(&variable.value),
                double_quote(&path)
            ));
            w.line(&format!(
                "export {}={}",
                shell_escape(&variable.key),
                double_quote(&path)
            ));
        } else {
            let value = if variable.file {
                info.tmp_file(&variable.key)
            } else {
                variable.value.clone()
            };
            w.line(&format!(
                "export {}={}",
                shell_escape(&variable.key),
                shell_escape(&value)
            ));
        }
    }
    let env_file = info.tmp_file(GITLAB_ENV_FILE);
    w.line(&format!("export GITLAB_ENV={}", shell_escape(&env_file)));
    w.line(&format!("mkdir -p {}", double_quote(&tmp)));
    w.line(&format!("touch {}", double_quote(&env_file)));
    w.line(&format!(
        "while read -r line; do export \"$line\"; done < {}",
        double_quote(&env_file)
    ));
}

fn cd_project(info: &ScriptInfo, w: &mut Writer) {
    w.command(&["cd", &info.project_dir]);
}

fn prepare_script(info: &ScriptInfo, w: &mut Writer) {
    w.rm_file(&info.tmp_file(GITLAB_ENV_FILE));
    w.rm_file(&info.tmp_file("masking.db"));
}

fn get_sources(info: &ScriptInfo, w: &mut Writer) {
    exports(info, w, false);
    w.line("export GIT_TERMINAL_PROMPT=0");
    w.line("export GCM_INTERACTIVE=Never");
    let fetch = matches!(info.git_strategy.as_str(), "fetch" | "clone") && !info.git.sha.is_empty();
    match info.git_strategy.as_str() {
        "empty" => {
            w.notice("Skipping Git repository setup and creating an empty build directory");
            w.command(&["rm", "-r", "-f", &info.project_dir]);
        }
        _ if fetch => {
            // The runner's `writeRefspecFetchCmd`, reduced: no credential helper, template
            // dir or LFS (§4.1); `clone` starts from an empty directory.
            w.notice("Fetching changes...");
            if info.git_strategy == "clone" {
                w.command(&["rm", "-r", "-f", &info.project_dir]);
            }
            w.command(&["git", "init", &info.project_dir]);
            cd_project(info, w);
            w.if_cmd(
                &["git", "remote", "add", "origin", &info.git.repo_url],
                true,
            );
            w.notice("Created fresh repository.");
            w.else_();
            w.command(&["git", "remote", "set-url", "origin", &info.git.repo_url]);
            w.end_if();
            let mut fetch_args = vec!["git", "fetch", "origin", "--no-recurse-submodules"];
            fetch_args.extend(info.git.refspecs.iter().map(String::as_str));
            fetch_args.extend(["--prune", "--quiet"]);
            w.command(&fetch_args);
            let short = &info.git.sha[..info.git.sha.len().min(8)];
            w.notice(&format!(
                "Checking out {short} as detached HEAD (ref is {})...",
                info.git.git_ref
            ));
            w.command(&[
                "git",
                "-c",
                "submodule.recurse=false",
                "checkout",
                "-f",
                "-q",
                &info.git.sha,
            ]);
            w.command(&["git", "clean", "-ffdx"]);
            w.notice("Skipping Git submodules setup");
            return;
        }
        other => {
            if other != "none" {
                w.warning(&format!(
                    "The job has no repository to fetch (GIT_STRATEGY={other}); treating it as none"
                ));
            }
            w.notice("Skipping Git repository setup");
        }
    }
    w.command(&["mkdir", "-p", &info.project_dir]);
    // Without a repository there is no checkout and no submodule update, and the runner says
    // so (`writeCheckoutCmd`, `writeSubmoduleUpdateCmds`); seen from runner 17.9.3.
    w.notice("Skipping Git checkout");
    w.notice("Skipping Git submodules setup");
}

fn clear_worktree(info: &ScriptInfo, w: &mut Writer) {
    w.line(&format!(
        "if [ -d {} ]; then",
        double_quote(&info.project_dir)
    ));
    w.indent += 1;
    cd_project(info, w);
    w.command(&["git", "rm", "-r", "-f", "--ignore-unmatch", "--quiet", "."]);
    w.command(&["git", "clean", "-ffdx", "-q"]);
    w.end_if();
}

/// `<cache_dir>/<namespace>/<project>/<key>/cache.zip`, written relative to CI_PROJECT_DIR
/// as the runner does (§8).
fn cache_file(info: &ScriptInfo, key: &str) -> String {
    relative_path(
        &info.project_dir,
        &format!("{}/{key}/cache.zip", info.cache_project_dir),
    )
}

/// `target` relative to the directory `base`; both absolute, `/`-separated.
pub fn relative_path(base: &str, target: &str) -> String {
    let base: Vec<&str> = base.split('/').filter(|s| !s.is_empty()).collect();
    let target: Vec<&str> = target.split('/').filter(|s| !s.is_empty()).collect();
    let common = base.iter().zip(&target).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<&str> = vec![".."; base.len() - common];
    parts.extend(&target[common..]);
    if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    }
}

/// The start of a cache or artifact stage: skipped without work (`ErrSkipBuildStage`),
/// otherwise the exports and the `cd` to the project dir.
fn begin_project_stage(info: &ScriptInfo, w: &mut Writer, has_work: bool) -> Option<()> {
    if !has_work {
        return None;
    }
    exports(info, w, false);
    cd_project(info, w);
    Some(())
}

fn path_args(paths: &[String]) -> Vec<&str> {
    paths.iter().flat_map(|p| ["--path", p.as_str()]).collect()
}

fn restore_cache(info: &ScriptInfo, w: &mut Writer) -> Option<()> {
    let entries: Vec<&CacheEntry> = info.cache.iter().filter(|c| !c.paths.is_empty()).collect();
    begin_project_stage(info, w, !entries.is_empty())?;
    let timeout = CACHE_REQUEST_TIMEOUT_MIN.to_string();
    for entry in entries {
        let file = cache_file(info, &entry.key);
        w.notice(&format!("Checking cache for {}...", entry.key));
        w.guard_runner_command("Extracting cache", |w| {
            w.if_cmd(
                &[
                    RUNNER_COMMAND,
                    "cache-extractor",
                    "--file",
                    &file,
                    "--timeout",
                    &timeout,
                ],
                false,
            );
            w.notice("Successfully extracted cache");
            w.else_();
            w.warning("Failed to extract cache");
            w.end_if();
        });
    }
    Some(())
}

fn download_artifacts(info: &ScriptInfo, w: &mut Writer) -> Option<()> {
    begin_project_stage(info, w, !info.dependencies.is_empty())?;
    w.guard_runner_command("Artifacts downloading", |w| {
        for dep in &info.dependencies {
            let id = dep.id.to_string();
            w.notice(&format!("Downloading artifacts for {} ({id})...", dep.name));
            w.command(&[
                RUNNER_COMMAND,
                "artifacts-downloader",
                "--url",
                &info.server_url,
                "--token",
                &dep.token,
                "--id",
                &id,
            ]);
        }
    });
    Some(())
}

fn when_applies(when: &str, on_success: bool) -> bool {
    match when {
        "always" => true,
        "on_failure" => !on_success,
        _ => on_success,
    }
}

fn archive_cache(info: &ScriptInfo, w: &mut Writer, on_success: bool) -> Option<()> {
    let entries: Vec<&CacheEntry> = info
        .cache
        .iter()
        .filter(|c| when_applies(&c.when, on_success) && !c.paths.is_empty())
        .collect();
    begin_project_stage(info, w, !entries.is_empty())?;
    let timeout = CACHE_REQUEST_TIMEOUT_MIN.to_string();
    for entry in entries {
        let file = cache_file(info, &entry.key);
        w.guard_runner_command("Creating cache", |w| {
            w.notice(&format!("Creating cache {}...", entry.key));
            let mut args = vec![
                RUNNER_COMMAND,
                "cache-archiver",
                "--file",
                &file,
                "--timeout",
                &timeout,
            ];
            args.extend(path_args(&entry.paths));
            w.if_cmd(&args, false);
            w.notice("Created cache");
            w.else_();
            w.warning("Failed to create cache");
            w.end_if();
        });
    }
    Some(())
}

fn upload_artifacts(info: &ScriptInfo, w: &mut Writer, on_success: bool) -> Option<()> {
    let entries: Vec<&ArtifactEntry> = info
        .artifacts
        .iter()
        .filter(|a| when_applies(&a.when, on_success) && !a.paths.is_empty())
        .collect();
    begin_project_stage(info, w, !info.server_url.is_empty() && !entries.is_empty())?;
    let id = info.job_id.to_string();
    for entry in entries {
        w.guard_runner_command("Uploading artifacts", |w| {
            w.notice("Uploading artifacts...");
            let mut args = vec![
                RUNNER_COMMAND,
                "artifacts-uploader",
                "--url",
                &info.server_url,
                "--token",
                &info.job_token,
                "--id",
                &id,
            ];
            args.extend(path_args(&entry.paths));
            args.extend(["--artifact-format", "zip", "--artifact-type", "archive"]);
            w.command(&args);
        });
    }
    Some(())
}

/// `writeUserScript` and `writeAfterScript`: each command echoed in green as `$ cmd`, then run.
fn user_step(info: &ScriptInfo, w: &mut Writer, step: &str, after: bool) -> Option<()> {
    let step = info.steps.iter().find(|s| s.name == step)?;
    if after && step.script.is_empty() {
        return None;
    }
    exports(info, w, false);
    cd_project(info, w);
    if after {
        w.notice("Running after script...");
    }
    for command in &step.script {
        let command = command.trim();
        if command.is_empty() {
            w.line("echo");
        } else if let Some((first, _)) = command.split_once('\n') {
            w.notice(&format!("$ {first} # collapsed multi-line command"));
        } else {
            w.notice(&format!("$ {command}"));
        }
        w.line(command);
    }
    Some(())
}

fn cleanup_file_variables(info: &ScriptInfo, w: &mut Writer) {
    exports(info, w, true);
    w.rm_file(&info.tmp_file(GITLAB_ENV_FILE));
    w.rm_file(&info.tmp_file("masking.db"));
    for variable in info.variables.iter().filter(|v| v.file) {
        w.rm_file(&info.tmp_file(&variable.key));
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn info(dir: &str, script: &[&str]) -> ScriptInfo {
        ScriptInfo {
            shell: "bash".into(),
            variables: vec![
                JobVariable {
                    key: "GREETING".into(),
                    value: "it's \"here\"\n$HOME".into(),
                    ..JobVariable::default()
                },
                JobVariable {
                    key: "SECRET_FILE".into(),
                    value: "content".into(),
                    file: true,
                    ..JobVariable::default()
                },
            ],
            project_dir: format!("{dir}/drover/demo"),
            cache_project_dir: format!("{dir}/cache/drover/demo"),
            git_strategy: "none".into(),
            steps: vec![JobStep {
                name: "script".into(),
                script: script.iter().map(|s| s.to_string()).collect(),
                ..JobStep::default()
            }],
            ..ScriptInfo::default()
        }
    }

    fn run(script: &str) -> std::process::Output {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("script");
        std::fs::write(&path, script).expect("write");
        Command::new("bash").arg(&path).output().expect("bash runs")
    }

    #[test]
    fn escaping_matches_the_runner() {
        assert_eq!(shell_escape("plain/path-1.0"), "plain/path-1.0");
        assert_eq!(shell_escape(""), "''");
        assert_eq!(shell_escape("a b"), "$'a b'");
        assert_eq!(shell_escape("it's\n"), "$'it\\'s\\n'");
        assert_eq!(shell_escape("\x1b[0;m"), "$'\\x1b[0;m'");
    }

    #[test]
    fn the_script_has_the_runner_shape() {
        let script = generate(&info("/b", &["true"]), &SubStage::BuildScript).expect("not skipped");
        assert!(
            script.starts_with("#!/usr/bin/env bash\n\ntrap 'exit 1' TERM\n\ncase \"$(set -o)\"")
        );
        assert!(script.contains("set -o errexit\nset +o noclobber\n(trap 'exit 1' TERM; eval $'"));
        assert!(script.ends_with("') < /dev/null\nexit 0\n"));
    }

    #[test]
    fn build_script_echoes_commands_and_exits_with_their_status() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().to_str().expect("utf-8 temp path");
        let info = info(
            base,
            &[
                "echo \"$GREETING\"",
                "cat \"$SECRET_FILE\"; echo",
                "exit 7",
                "echo never",
            ],
        );
        let sources = generate(&info, &SubStage::GetSources).expect("get_sources");
        let output = Command::new("bash")
            .arg("-c")
            .arg(&sources)
            .output()
            .expect("bash");
        assert!(output.status.success(), "{output:?}");
        let output = run(&generate(&info, &SubStage::BuildScript).expect("build"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(7), "{stdout}");
        assert!(stdout.contains("\x1b[32;1m$ exit 7\x1b[0;m\n"), "{stdout}");
        assert!(stdout.contains("it's \"here\"\n$HOME\n"), "{stdout}");
        assert!(stdout.contains("content\n"), "{stdout}");
        assert!(!stdout.contains("never"));
    }

    /// Pins a difference found against runner 17.9.3: without a repository it also says
    /// that checkout and submodules are skipped.
    #[test]
    fn get_sources_without_a_repository_says_what_it_skips() {
        let mut info = info("/b", &["true"]);
        info.git_strategy = "none".into();
        let script = generate(&info, &SubStage::GetSources).expect("get_sources always runs");
        for notice in [
            "Skipping Git repository setup",
            "Skipping Git checkout",
            "Skipping Git submodules setup",
        ] {
            assert!(script.contains(notice), "{notice}: {script}");
        }
    }

    #[test]
    fn stages_without_work_are_skipped() {
        let info = info("/b", &["true"]);
        for stage in [
            SubStage::RestoreCache,
            SubStage::DownloadArtifacts,
            SubStage::AfterScript,
            SubStage::ArchiveCache,
            SubStage::UploadArtifactsOnSuccess,
        ] {
            assert_eq!(generate(&info, &stage), None, "{stage}");
        }
    }

    #[test]
    fn cache_and_artifacts_are_guarded() {
        let mut info = info("/builds", &["true"]);
        info.cache_project_dir = "/cache/drover/demo".into();
        info.cache = vec![CacheEntry {
            key: "default".into(),
            paths: vec!["vendor/".into()],
            when: "on_success".into(),
        }];
        info.artifacts = vec![ArtifactEntry {
            paths: vec!["out/".into()],
            when: "on_failure".into(),
        }];
        info.server_url = "http://127.0.0.1".into();
        let restore = generate(&info, &SubStage::RestoreCache).expect("restore");
        assert!(restore.contains("gitlab-runner cache-extractor --file ../../../cache/drover/demo/default/cache.zip --timeout 10"), "{restore}");
        assert!(restore.contains("Missing gitlab-runner. Extracting cache is disabled."));
        assert!(generate(&info, &SubStage::ArchiveCacheOnFailure).is_none());
        assert!(generate(&info, &SubStage::UploadArtifactsOnSuccess).is_none());
        let upload = generate(&info, &SubStage::UploadArtifactsOnFailure).expect("upload");
        assert!(upload.contains("Missing gitlab-runner. Uploading artifacts is disabled."));
        // Without gitlab-runner on PATH the guarded stage still succeeds (§8).
        let output = Command::new("bash")
            .arg("-c")
            .arg(restore.replace("cd /builds/drover/demo", "true"))
            .env("PATH", "/usr/bin:/bin")
            .output()
            .expect("bash");
        assert!(output.status.success(), "{output:?}");
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path("/b/ns/p", "/c/ns/p/k/cache.zip"),
            "../../../c/ns/p/k/cache.zip"
        );
        assert_eq!(relative_path("/b", "/b/x"), "x");
    }
}
