//! A warm pool of job environments (cloud instances, VMs) started ahead of demand, written
//! once for every driver that starts slow environments. The backend is a [`Provider`]: launch,
//! list what the runner owns, terminate. Everything else is here: which environment a job
//! gets, when to launch more, when to remove idle ones, and a journal that makes all of it
//! survive a driver killed at any point and a runner host that restarts.
//!
//! # Without a daemon
//!
//! Every stage is a process of its own (§1.4), so the pool is not a process either: each
//! prepare, cleanup and gc loads the journal under the state lock, does its part, and saves
//! it. A running job depends on no pool process, so nothing a restart of the runner host does
//! to the pool kills a job's environment; what the runner host forgets is in the journal, and
//! what the journal may not know (a launch cut off by a crash) is in the provider's tags.
//! Idle removal and replenishment happen at each prepare and cleanup; `gc` runs the same
//! upkeep for a runner that gets no jobs (run it from a timer).
//!
//! # The journal
//!
//! `<dir>/pool.json`, replaced whole ([`crate::state::write_atomic`]) **before** each side
//! effect: an intent with its idempotency token before a launch, the retiring state before a
//! terminate. After a crash, an open intent is resolved by the provider's tags (every
//! environment carries the intent that launched it from its creation): what a job's launch
//! made is terminated, what a launch for the pool made is adopted if it never ran a job.
//!
//! # The rules
//!
//! - An environment serves one job unless `max_builds > 1`, and then only after the driver's
//!   reset step passed ([`Pool::release`] with `reusable`); one whose history is unknown (the
//!   journal lost it and its tags say it was used) is never handed out again.
//! - One whose job may still run is never removed before its lease expires.
//! - Idle ones beyond the idle target are removed only after `idle_time` idle, oldest first,
//!   and never below the target: a burst of jobs does not make the pool churn.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::state::{StateLock, write_atomic};
use crate::{Error, Result, ResultExt, progress};

mod period;

pub use period::Period;

/// The docker+machine autoscaling options, under their names there (see the drivers' READMEs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// How many idle environments to keep ready (`IdleCount`).
    #[serde(default)]
    pub idle_count: usize,
    /// Seconds an environment may stay idle beyond the idle target before it is removed
    /// (`IdleTime`).
    #[serde(default = "default_idle_time")]
    pub idle_time: u64,
    /// How many jobs one environment may run (`MaxBuilds`); 1, the default, is one fresh
    /// environment per job.
    #[serde(default = "default_max_builds")]
    pub max_builds: u32,
    /// How many environments may exist at once, in any state (`[[runners]] limit` for
    /// docker+machine); 0 is no cap.
    #[serde(default)]
    pub max_instances: usize,
    /// Time-of-day overrides (`[[runners.machine.autoscaling]]`); the last matching one wins.
    #[serde(default)]
    pub periods: Vec<Period>,
}

fn default_idle_time() -> u64 {
    600
}

fn default_max_builds() -> u32 {
    1
}

impl Default for PoolSettings {
    fn default() -> PoolSettings {
        PoolSettings {
            idle_count: 0,
            idle_time: default_idle_time(),
            max_builds: default_max_builds(),
            max_instances: 0,
            periods: Vec::new(),
        }
    }
}

impl PoolSettings {
    /// Checks the periods (their cron fields and time zones).
    pub fn validate(&self) -> Result<()> {
        if self.max_builds == 0 {
            return Err(Error::system(
                "max_builds = 0 runs no job at all; set it to 1 or more",
            ));
        }
        for period in &self.periods {
            period.validate()?;
        }
        Ok(())
    }

    /// The idle target and idle time in force at `now`.
    pub fn in_force(&self, now: SystemTime) -> (usize, Duration) {
        let mut idle = (self.idle_count, Duration::from_secs(self.idle_time));
        for period in &self.periods {
            if period.matches(now) {
                idle = (
                    period.idle_count.unwrap_or(idle.0),
                    period.idle_time.map_or(idle.1, Duration::from_secs),
                );
            }
        }
        idle
    }
}

/// What the provider sees of one environment it owns for this runner.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Its id.
    pub id: String,
    /// The intent that launched it (from its tags).
    pub intent: Option<String>,
    /// The job it runs or ran last, if any (from its tags).
    pub job: Option<String>,
    /// How many jobs it was leased to (from its tags).
    pub uses: u32,
    /// Unix time after which nobody may still be using it (from its tags).
    pub expires: Option<u64>,
    /// Whether the driver still has what it needs to reach it (its key).
    pub reachable: bool,
}

/// A launch the journal holds before the provider is called.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Intent {
    /// Unique; every environment of the launch carries it.
    pub id: String,
    /// The idempotency token: a repeated call with it launches nothing more. At most 40
    /// characters, so a provider may add a suffix of its own.
    pub token: String,
    /// How many environments.
    pub count: usize,
    /// The job it is for (`None`: for the pool's idle target).
    pub job: Option<String>,
    /// The launch settings' fingerprint: only environments of the current settings are used.
    pub key: String,
    /// Unix time of the intent.
    pub at: u64,
}

/// A backend that can run the pool: one provider per driver.
#[allow(async_fn_in_trait)] // driven by the core's single-threaded runtime
pub trait Provider {
    /// Launches `intent.count` environments, each tagged with `intent.id` (and the job, when
    /// it has one) at creation, and returns their ids.
    async fn launch(&self, intent: &Intent) -> Result<Vec<String>>;
    /// Every live environment of this runner (one call).
    async fn list(&self) -> Result<Vec<Observed>>;
    /// Terminates `ids`; one that is already gone counts as done.
    async fn terminate(&self, ids: &[String]) -> Result<()>;
}

/// Where an environment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Ready for a job.
    Idle,
    /// A job has it.
    Leased,
    /// Being terminated.
    Retiring,
}

/// One environment in the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Where it is in its life.
    pub state: State,
    /// Jobs it was leased to.
    pub uses: u32,
    /// The launch settings' fingerprint.
    pub key: String,
    /// The job that has it, when leased.
    pub job: Option<String>,
    /// Unix time it was launched.
    pub launched: u64,
    /// Unix time it last became idle.
    pub since: u64,
    /// Unix time after which its lease is abandoned (when leased).
    pub lease_expires: Option<u64>,
    /// The intent that launched it: the driver keeps what it made for the launch (a key)
    /// under this id.
    #[serde(default)]
    pub intent: String,
}

/// The journal's content.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Journal {
    /// Environments by id.
    pub entries: BTreeMap<String, Entry>,
    /// Launches whose result is not recorded yet.
    pub intents: BTreeMap<String, Intent>,
}

impl Journal {
    /// The journal of the pool in `dir` (empty when there is none yet). Reading needs no
    /// lock: the file is only ever replaced whole.
    pub fn read(dir: &Path) -> Result<Journal> {
        let path = dir.join("pool.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| {
                Error::system(format!(
                    "the pool journal {} is not readable ({err}); move it away and run gc, which adopts or terminates what it finds by tags",
                    path.display()
                ))
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(err) => Err(err).or_system(format_args!("cannot read {}", path.display())),
        }
    }

    /// The environment leased to `job`, if any: what a run stage reaches.
    pub fn leased_to(&self, job: &str) -> Option<String> {
        self.entries
            .iter()
            .find(|(_, entry)| entry.state == State::Leased && entry.job.as_deref() == Some(job))
            .map(|(id, _)| id.clone())
    }
}

/// How a job got its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The environment's id.
    pub id: String,
    /// Launched for this job (a cold start) rather than taken from the pool.
    pub launched: bool,
    /// Which use of the environment this is (1 for a fresh one).
    pub use_number: u32,
    /// The intent that launched it (see [`Entry::intent`]).
    pub intent: String,
}

/// What [`Pool::upkeep`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Upkeep {
    /// Environments launched for the idle target.
    pub launched: Vec<String>,
    /// Environments terminated, with why.
    pub terminated: Vec<(String, String)>,
    /// Environments found by their tags and adopted into the pool.
    pub adopted: Vec<String>,
}

/// How long an open intent may wait for what it launched to show up in the provider's list.
pub const INTENT_GRACE: Duration = Duration::from_secs(300);

/// How long a job's lease lasts beyond its timeout before the pool takes it as abandoned.
pub const LEASE_GRACE: Duration = Duration::from_secs(3600);

/// The pool of one runner (see the module docs).
pub struct Pool<'a, P> {
    dir: PathBuf,
    provider: &'a P,
    settings: &'a PoolSettings,
    key: String,
}

/// A fingerprint of launch settings for [`Pool::new`]'s key: FNV-1a, which, unlike std's
/// hasher, stays the same across builds, so an upgraded driver keeps its idle environments.
pub fn fingerprint(settings: &str) -> String {
    let hash = settings
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{hash:016x}")
}

/// Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl<'a, P: Provider> Pool<'a, P> {
    /// The pool whose journal is in `dir`, for environments launched with settings whose
    /// fingerprint is `key`.
    pub fn new(dir: &Path, provider: &'a P, settings: &'a PoolSettings, key: &str) -> Pool<'a, P> {
        Pool {
            dir: dir.to_owned(),
            provider,
            settings,
            key: key.to_owned(),
        }
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("pool.json")
    }

    /// Reads the journal (empty when there is none yet).
    pub fn load(&self) -> Result<Journal> {
        Journal::read(&self.dir)
    }

    fn save(&self, journal: &Journal) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(journal)
            .map_err(|err| Error::system(format!("cannot encode the pool journal: {err}")))?;
        write_atomic(&self.journal_path(), &bytes)
    }

    /// Gives `job` an environment: the oldest idle one of the current settings, else one
    /// launched for it now. `lease` is how long the job may hold it (its timeout). `skip`
    /// are environments the caller found broken and must not get again.
    pub async fn take(&self, job: &str, lease: Duration, skip: &[String]) -> Result<Lease> {
        let _lock = StateLock::acquire(&self.dir).await?;
        let mut journal = self.load()?;
        // An earlier attempt of this job's prepare (the runner tries it three times, §5.1)
        // that never got to its cleanup: its environment is the job's no more.
        let earlier: Vec<String> = journal
            .entries
            .iter()
            .filter(|(_, entry)| entry.state == State::Leased && entry.job.as_deref() == Some(job))
            .map(|(id, _)| id.clone())
            .collect();
        self.retire(&mut journal, &earlier).await?;
        let now = unix_now();
        let expires = now + lease.as_secs() + LEASE_GRACE.as_secs();
        let idle = journal
            .entries
            .iter()
            .filter(|(id, entry)| {
                entry.state == State::Idle && entry.key == self.key && !skip.contains(id)
            })
            .min_by_key(|(_, entry)| (entry.uses, entry.launched))
            .map(|(id, _)| id.clone());
        if let Some(id) = idle {
            let entry = journal
                .entries
                .get_mut(&id)
                .ok_or_else(|| Error::system("the pool journal changed under its lock"))?;
            entry.state = State::Leased;
            entry.uses += 1;
            entry.job = Some(job.to_owned());
            entry.lease_expires = Some(expires);
            let (use_number, intent) = (entry.uses, entry.intent.clone());
            self.save(&journal)?;
            return Ok(Lease {
                id,
                launched: false,
                use_number,
                intent,
            });
        }
        if self.settings.max_instances > 0 && journal.entries.len() >= self.settings.max_instances {
            return Err(Error::system(format!(
                "max_instances = {} environments exist and none is idle; raise max_instances or lower the runner's limit to it",
                self.settings.max_instances
            )));
        }
        let id = self.launch_for(&mut journal, job).await?;
        let entry = journal
            .entries
            .get_mut(&id)
            .ok_or_else(|| Error::system("the launch was not recorded in the pool journal"))?;
        entry.state = State::Leased;
        entry.uses = 1;
        entry.job = Some(job.to_owned());
        entry.lease_expires = Some(expires);
        let intent = entry.intent.clone();
        self.save(&journal)?;
        Ok(Lease {
            id,
            launched: true,
            use_number: 1,
            intent,
        })
    }

    /// Launches under a new intent saved first; records the result.
    async fn launch(
        &self,
        journal: &mut Journal,
        count: usize,
        job: Option<&str>,
    ) -> Result<Vec<String>> {
        let at = unix_now();
        let id = format!("{at:x}{:08x}", fastrand::u32(..));
        let intent = Intent {
            // Derived from the job's name (its trusted identity), and short: a cloud's
            // tokens are bounded (EC2: 64 characters) and a driver may add a suffix.
            token: format!("{}-{id}", fingerprint(job.unwrap_or("pool"))),
            id,
            count,
            job: job.map(str::to_owned),
            key: self.key.clone(),
            at,
        };
        self.launch_under(journal, intent).await
    }

    /// Launches under `intent`, saved first; records the result.
    async fn launch_under(&self, journal: &mut Journal, intent: Intent) -> Result<Vec<String>> {
        journal.intents.insert(intent.id.clone(), intent.clone());
        self.save(journal)?;
        let launched = self.provider.launch(&intent).await;
        // A failed launch may still have launched (a lost answer): the intent stays open
        // then, for a retry of the job's prepare or the next upkeep to resolve.
        let ids = launched?;
        self.record(journal, &intent, &ids)?;
        Ok(ids)
    }

    /// Closes `intent`: `ids` are what it launched, idle until leased.
    fn record(&self, journal: &mut Journal, intent: &Intent, ids: &[String]) -> Result<()> {
        journal.intents.remove(&intent.id);
        for instance in ids {
            journal.entries.insert(
                instance.clone(),
                Entry {
                    state: State::Idle,
                    uses: 0,
                    key: intent.key.clone(),
                    job: None,
                    launched: intent.at,
                    since: intent.at,
                    lease_expires: None,
                    intent: intent.id.clone(),
                },
            );
        }
        self.save(journal)
    }

    /// Launches `job`'s environment. An earlier attempt of its prepare that was cut off in
    /// its launch left the launch's intent open: this attempt carries on under that intent.
    /// What the provider already lists under it is the job's; otherwise the same call again,
    /// whose idempotency token makes the provider answer with what the cut-off call launched
    /// instead of launching a second one.
    async fn launch_for(&self, journal: &mut Journal, job: &str) -> Result<String> {
        let cut_off = journal
            .intents
            .values()
            .find(|intent| {
                intent.job.as_deref() == Some(job) && intent.key == self.key && intent.count == 1
            })
            .cloned();
        let ids = match cut_off {
            Some(mut intent) => {
                let listed: Vec<String> = self
                    .provider
                    .list()
                    .await?
                    .into_iter()
                    .filter(|seen| seen.intent.as_deref() == Some(intent.id.as_str()))
                    .map(|seen| seen.id)
                    .collect();
                if listed.is_empty() {
                    // A fresh grace for upkeep, should this attempt be cut off too.
                    intent.at = unix_now();
                    self.launch_under(journal, intent).await?
                } else {
                    self.record(journal, &intent, &listed)?;
                    listed
                }
            }
            None => self.launch(journal, 1, Some(job)).await?,
        };
        ids.into_iter()
            .next()
            .ok_or_else(|| Error::system("the launch returned no environment"))
    }

    /// Hands `job`'s environment back: to the idle pool when `reusable` (the driver's reset
    /// step passed) and it has runs left, else terminated. Returns the environment and whether
    /// it was terminated.
    pub async fn release(&self, job: &str, reusable: bool) -> Result<Option<(String, bool)>> {
        let _lock = StateLock::acquire(&self.dir).await?;
        let mut journal = self.load()?;
        let Some((id, entry)) = journal
            .entries
            .iter_mut()
            .find(|(_, entry)| entry.state == State::Leased && entry.job.as_deref() == Some(job))
        else {
            return Ok(None);
        };
        let id = id.clone();
        if reusable && entry.uses < self.settings.max_builds && entry.key == self.key {
            entry.state = State::Idle;
            entry.job = None;
            entry.lease_expires = None;
            entry.since = unix_now();
            self.save(&journal)?;
            return Ok(Some((id, false)));
        }
        self.retire(&mut journal, std::slice::from_ref(&id)).await?;
        Ok(Some((id, true)))
    }

    /// The environment leased to `job`, for cleanup.
    pub fn leased_to(&self, job: &str) -> Result<Option<String>> {
        Ok(self.load()?.leased_to(job))
    }

    /// Whether a launch for `job` may have happened without its result being recorded (the
    /// driver was stopped during the call).
    pub fn launch_open_for(&self, job: &str) -> Result<bool> {
        Ok(self
            .load()?
            .intents
            .values()
            .any(|intent| intent.job.as_deref() == Some(job)))
    }

    /// Terminates `ids`, their retiring state saved first.
    async fn retire(&self, journal: &mut Journal, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        for id in ids {
            if let Some(entry) = journal.entries.get_mut(id) {
                entry.state = State::Retiring;
            }
        }
        self.save(journal)?;
        self.provider.terminate(ids).await?;
        for id in ids {
            journal.entries.remove(id);
        }
        self.save(journal)
    }

    /// Terminates environment `id` at once (it failed its health check).
    pub async fn discard(&self, id: &str) -> Result<()> {
        let _lock = StateLock::acquire(&self.dir).await?;
        let mut journal = self.load()?;
        journal
            .entries
            .entry(id.to_owned())
            .or_insert_with(|| Entry {
                state: State::Retiring,
                uses: 0,
                key: String::new(),
                job: None,
                launched: 0,
                since: 0,
                lease_expires: None,
                intent: String::new(),
            });
        self.retire(&mut journal, &[id.to_owned()]).await
    }

    /// Brings the pool in line with the provider and the settings: forgets environments that
    /// are gone, resolves open intents, adopts or terminates what only the tags know,
    /// terminates abandoned leases, idle environments of old settings and idle ones beyond
    /// the target past `idle_time`, and launches up to the idle target. One list call, plus
    /// one launch and one terminate call when there is something to do.
    pub async fn upkeep(&self) -> Result<Upkeep> {
        let _lock = StateLock::acquire(&self.dir).await?;
        let mut journal = self.load()?;
        let mut report = Upkeep::default();
        let observed = self.provider.list().await?;
        let now = unix_now();
        let live: BTreeMap<&str, &Observed> = observed.iter().map(|o| (o.id.as_str(), o)).collect();
        let mut doomed: Vec<(String, String)> = Vec::new();

        // Gone outside the pool's hands (terminated elsewhere, reclaimed spot capacity).
        journal
            .entries
            .retain(|id, entry| live.contains_key(id.as_str()) || entry.state == State::Retiring);
        for (id, entry) in &journal.entries {
            if entry.state == State::Retiring {
                doomed.push((id.clone(), "its termination was cut off".into()));
            }
        }

        // What the journal does not know: launches cut off by a crash, or a lost journal.
        for seen in &observed {
            if journal.entries.contains_key(&seen.id) {
                continue;
            }
            let intent = seen.intent.as_ref().and_then(|id| journal.intents.get(id));
            let expired = seen.expires.is_some_and(|at| at <= now);
            let adoptable = seen.uses == 0
                && seen.job.is_none()
                && seen.reachable
                && !expired
                && intent.is_none_or(|intent| intent.job.is_none() && intent.key == self.key);
            if adoptable {
                journal.entries.insert(
                    seen.id.clone(),
                    Entry {
                        state: State::Idle,
                        uses: 0,
                        key: intent.map_or_else(|| self.key.clone(), |i| i.key.clone()),
                        job: None,
                        launched: intent.map_or(now, |i| i.at),
                        since: now,
                        lease_expires: None,
                        intent: seen.intent.clone().unwrap_or_default(),
                    },
                );
                report.adopted.push(seen.id.clone());
            } else if seen.job.is_some() && intent.is_none() && !expired {
                // Its job may still run (the journal was lost): not before its lease expires.
            } else {
                let why = if intent.is_some_and(|i| i.job.is_some()) {
                    "its job's launch was cut off"
                } else if seen.uses > 0 || seen.job.is_some() {
                    "it ran a job the pool has no record of"
                } else {
                    "the pool cannot reach it (no key)"
                };
                doomed.push((seen.id.clone(), why.into()));
            }
        }
        // An intent is resolved once all it launched has been seen (and adopted or doomed),
        // or after a grace: a launch cut off by a crash may still show up a moment later.
        let mut seen_of: BTreeMap<&str, usize> = BTreeMap::new();
        for seen in &observed {
            if let Some(intent) = &seen.intent {
                *seen_of.entry(intent.as_str()).or_default() += 1;
            }
        }
        journal.intents.retain(|id, intent| {
            seen_of.get(id.as_str()).copied().unwrap_or(0) < intent.count
                && now.saturating_sub(intent.at) < INTENT_GRACE.as_secs()
        });

        let (target, idle_time) = self.settings.in_force(SystemTime::now());
        let mut idle: Vec<(String, u64)> = Vec::new();
        for (id, entry) in &journal.entries {
            match entry.state {
                State::Leased if entry.lease_expires.is_some_and(|at| at <= now) => {
                    doomed.push((id.clone(), "its job's lease expired".into()));
                }
                State::Idle if entry.key != self.key => {
                    doomed.push((id.clone(), "it was launched with other settings".into()));
                }
                State::Idle => idle.push((id.clone(), entry.since)),
                _ => {}
            }
        }
        idle.sort_by_key(|(_, since)| *since);
        let mut surplus = idle.len().saturating_sub(target);
        for (id, since) in &idle {
            if surplus == 0 {
                break;
            }
            if now.saturating_sub(*since) >= idle_time.as_secs() {
                doomed.push((
                    id.clone(),
                    format!("idle for more than {} s", idle_time.as_secs()),
                ));
                surplus -= 1;
            }
        }
        let ids: Vec<String> = doomed.iter().map(|(id, _)| id.clone()).collect();
        self.retire(&mut journal, &ids).await?;
        report.terminated = doomed;

        let idle_now = journal
            .entries
            .values()
            .filter(|entry| entry.state == State::Idle)
            .count();
        let mut missing = target.saturating_sub(idle_now);
        if self.settings.max_instances > 0 {
            missing = missing.min(
                self.settings
                    .max_instances
                    .saturating_sub(journal.entries.len()),
            );
        }
        if missing > 0 {
            match self.launch(&mut journal, missing, None).await {
                Ok(ids) => report.launched = ids,
                Err(err) => progress!("Launched nothing for the idle target of {target}: {err}"),
            }
        }
        self.save(&journal)?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests;
