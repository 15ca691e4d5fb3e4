//! The pool's rules against a fake provider: what a job gets, what is launched and what is
//! terminated, and what survives a crash at each journal step.

use std::cell::RefCell;

use super::*;

/// A cloud in memory: environments with the tags a real provider would set at creation.
#[derive(Default)]
struct FakeCloud {
    live: RefCell<Vec<Observed>>,
    next: RefCell<u32>,
    launches: RefCell<u32>,
    terminated: RefCell<Vec<String>>,
    /// Launch, then fail as if the answer was lost.
    lose_answer: RefCell<bool>,
    /// What each idempotency token launched: a repeated call answers the same.
    tokens: RefCell<std::collections::HashMap<String, Vec<String>>>,
}

impl Provider for FakeCloud {
    async fn launch(&self, intent: &Intent) -> Result<Vec<String>> {
        assert!(intent.token.len() <= 40, "{}", intent.token);
        if let Some(ids) = self.tokens.borrow().get(&intent.token) {
            return Ok(ids.clone());
        }
        *self.launches.borrow_mut() += 1;
        let mut ids = Vec::new();
        for _ in 0..intent.count {
            let mut next = self.next.borrow_mut();
            *next += 1;
            let id = format!("i-{next}");
            self.live.borrow_mut().push(Observed {
                id: id.clone(),
                intent: Some(intent.id.clone()),
                job: intent.job.clone(),
                uses: u32::from(intent.job.is_some()),
                expires: None,
                reachable: true,
            });
            ids.push(id);
        }
        self.tokens
            .borrow_mut()
            .insert(intent.token.clone(), ids.clone());
        if self.lose_answer.replace(false) {
            return Err(Error::transient("connection reset"));
        }
        Ok(ids)
    }

    async fn list(&self) -> Result<Vec<Observed>> {
        Ok(self.live.borrow().clone())
    }

    async fn terminate(&self, ids: &[String]) -> Result<()> {
        self.live.borrow_mut().retain(|o| !ids.contains(&o.id));
        self.terminated.borrow_mut().extend(ids.iter().cloned());
        Ok(())
    }
}

fn settings(idle_count: usize, idle_time: u64, max_builds: u32) -> PoolSettings {
    PoolSettings {
        idle_count,
        idle_time,
        max_builds,
        ..PoolSettings::default()
    }
}

const HOUR: Duration = Duration::from_secs(3600);

fn ids(cloud: &FakeCloud) -> Vec<String> {
    cloud.live.borrow().iter().map(|o| o.id.clone()).collect()
}

#[tokio::test]
async fn the_idle_target_is_kept_and_jobs_take_idle_environments_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = FakeCloud::default();
    let settings = settings(2, 600, 1);
    let pool = Pool::new(dir.path(), &cloud, &settings, "k1");
    let upkeep = pool.upkeep().await.expect("upkeep");
    assert_eq!(upkeep.launched.len(), 2);
    assert_eq!(
        *cloud.launches.borrow(),
        1,
        "one launch call for the whole target"
    );
    let lease = pool.take("j1", HOUR, &[]).await.expect("take");
    assert!(!lease.launched && lease.use_number == 1, "{lease:?}");
    // One job, one use: the environment is terminated when the job ends.
    assert_eq!(
        pool.release("j1", true).await.expect("release"),
        Some((lease.id.clone(), true))
    );
    assert!(!ids(&cloud).contains(&lease.id));
    pool.upkeep().await.expect("upkeep");
    assert_eq!(ids(&cloud).len(), 2, "back at the idle target");
}

#[tokio::test]
async fn a_job_with_no_idle_environment_gets_one_launched_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = FakeCloud::default();
    let settings = settings(0, 600, 1);
    let pool = Pool::new(dir.path(), &cloud, &settings, "k1");
    let lease = pool.take("j1", HOUR, &[]).await.expect("take");
    assert!(lease.launched);
    assert_eq!(pool.leased_to("j1").expect("journal"), Some(lease.id));
}

#[tokio::test]
async fn max_builds_reuses_an_environment_only_after_a_passed_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = FakeCloud::default();
    let settings = settings(0, 600, 2);
    let pool = Pool::new(dir.path(), &cloud, &settings, "k1");
    let first = pool.take("j1", HOUR, &[]).await.expect("take");
    assert_eq!(
        pool.release("j1", true).await.expect("release"),
        Some((first.id.clone(), false))
    );
    let second = pool.take("j2", HOUR, &[]).await.expect("take");
    assert_eq!(
        (second.id.clone(), second.use_number),
        (first.id.clone(), 2)
    );
    // Its second job was its last.
    assert_eq!(
        pool.release("j2", true).await.expect("release"),
        Some((first.id.clone(), true))
    );
    let third = pool.take("j3", HOUR, &[]).await.expect("take");
    // A failed reset retires it whatever max_builds says.
    assert_eq!(
        pool.release("j3", false).await.expect("release"),
        Some((third.id, true))
    );
}

#[tokio::test]
async fn idle_environments_go_only_past_idle_time_and_never_below_the_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = FakeCloud::default();
    let three = settings(3, 0, 1);
    Pool::new(dir.path(), &cloud, &three, "k1")
        .upkeep()
        .await
        .expect("upkeep");
    assert_eq!(ids(&cloud).len(), 3);
    // The target drops to 1, but idle_time has not passed: nothing goes.
    let one_later = settings(1, 3600, 1);
    let upkeep = Pool::new(dir.path(), &cloud, &one_later, "k1")
        .upkeep()
        .await
        .expect("upkeep");
    assert!(upkeep.terminated.is_empty(), "{upkeep:?}");
    // With idle_time passed, two go and one stays.
    let one_now = settings(1, 0, 1);
    let upkeep = Pool::new(dir.path(), &cloud, &one_now, "k1")
        .upkeep()
        .await
        .expect("upkeep");
    assert_eq!(upkeep.terminated.len(), 2, "{upkeep:?}");
    assert_eq!(ids(&cloud).len(), 1);
}

#[tokio::test]
async fn leased_environments_survive_upkeep_and_changed_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = FakeCloud::default();
    let settings = settings(1, 0, 1);
    let pool = Pool::new(dir.path(), &cloud, &settings, "k1");
    pool.upkeep().await.expect("upkeep");
    let lease = pool.take("j1", HOUR, &[]).await.expect("take");
    // New launch settings: the idle one of the old settings goes, the leased one stays.
    let pool2 = Pool::new(dir.path(), &cloud, &settings, "k2");
    pool2.upkeep().await.expect("upkeep");
    assert!(ids(&cloud).contains(&lease.id));
    let idle: Vec<String> = ids(&cloud)
        .into_iter()
        .filter(|id| *id != lease.id)
        .collect();
    assert_eq!(idle.len(), 1);
    assert_ne!(
        pool2.take("j2", HOUR, &[]).await.expect("take").id,
        lease.id
    );
}

#[tokio::test]
async fn a_lost_launch_answer_is_resolved_by_tags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = FakeCloud::default();
    let settings = settings(1, 600, 1);
    let pool = Pool::new(dir.path(), &cloud, &settings, "k1");
    // A job's launch whose answer was lost: its instance must not live on.
    *cloud.lose_answer.borrow_mut() = true;
    pool.take("j1", HOUR, &[]).await.expect_err("lost answer");
    // The idle target's launch whose answer was lost: its instance is adopted.
    *cloud.lose_answer.borrow_mut() = true;
    let upkeep = pool.upkeep().await.expect("upkeep");
    assert_eq!(upkeep.terminated.len(), 1, "{upkeep:?}");
    assert_eq!(upkeep.terminated[0].1, "its job's launch was cut off");
    assert!(upkeep.launched.is_empty());
    let upkeep = pool.upkeep().await.expect("upkeep");
    assert_eq!(upkeep.adopted.len(), 1, "{upkeep:?}");
    assert!(
        upkeep.launched.is_empty(),
        "the adopted one meets the target: {upkeep:?}"
    );
    assert_eq!(ids(&cloud).len(), 1);
    assert!(pool.load().expect("journal").intents.is_empty());
}

#[tokio::test]
async fn a_retried_prepare_after_a_lost_launch_answer_launches_nothing_more() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = FakeCloud::default();
    let settings = settings(0, 600, 1);
    let pool = Pool::new(dir.path(), &cloud, &settings, "k1");
    *cloud.lose_answer.borrow_mut() = true;
    pool.take("j1", HOUR, &[]).await.expect_err("lost answer");
    let launched = ids(&cloud);
    // The provider does not list it yet: the same token again gets the same answer.
    let hidden = cloud.live.take();
    let retry = pool.take("j1", HOUR, &[]).await.expect("retry");
    assert_eq!(
        (vec![retry.id.clone()], *cloud.launches.borrow()),
        (launched.clone(), 1)
    );
    assert!(pool.load().expect("journal").intents.is_empty());
    *cloud.live.borrow_mut() = hidden;
    // Once listed, a cut-off launch is found by its intent without calling launch again.
    *cloud.lose_answer.borrow_mut() = true;
    pool.take("j2", HOUR, &[]).await.expect_err("lost answer");
    cloud.tokens.borrow_mut().clear();
    let retry = pool.take("j2", HOUR, &[]).await.expect("retry");
    assert_eq!(*cloud.launches.borrow(), 2);
    assert_eq!(ids(&cloud), vec![launched[0].clone(), retry.id.clone()]);
    assert_eq!(pool.leased_to("j2").expect("journal"), Some(retry.id));
}

#[tokio::test]
async fn a_lost_journal_never_hands_out_a_used_environment_nor_kills_a_running_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = FakeCloud::default();
    let settings = settings(1, 600, 1);
    let pool = Pool::new(dir.path(), &cloud, &settings, "k1");
    pool.upkeep().await.expect("upkeep");
    let running = pool.take("j1", HOUR, &[]).await.expect("take");
    for observed in cloud.live.borrow_mut().iter_mut() {
        if observed.id == running.id {
            observed.job = Some("j1".into());
            observed.uses = 1;
            observed.expires = Some(unix_now() + 3600);
        }
    }
    std::fs::remove_file(dir.path().join("pool.json")).expect("lose the journal");
    let upkeep = pool.upkeep().await.expect("upkeep");
    assert!(
        ids(&cloud).contains(&running.id),
        "a job that may still run was killed"
    );
    assert!(upkeep.terminated.is_empty(), "{upkeep:?}");
    let next = pool.take("j2", HOUR, &[]).await.expect("take");
    assert_ne!(
        next.id, running.id,
        "a used environment was handed out again"
    );
    // Once its lease has expired it goes.
    for observed in cloud.live.borrow_mut().iter_mut() {
        if observed.id == running.id {
            observed.expires = Some(unix_now() - 1);
        }
    }
    pool.upkeep().await.expect("upkeep");
    assert!(!ids(&cloud).contains(&running.id));
}

#[tokio::test]
async fn max_instances_caps_launches_for_jobs_and_for_the_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = FakeCloud::default();
    let settings = PoolSettings {
        idle_count: 5,
        max_instances: 2,
        ..PoolSettings::default()
    };
    let pool = Pool::new(dir.path(), &cloud, &settings, "k1");
    pool.upkeep().await.expect("upkeep");
    assert_eq!(ids(&cloud).len(), 2);
    pool.take("j1", HOUR, &[]).await.expect("take");
    pool.take("j2", HOUR, &[]).await.expect("take");
    let err = pool.take("j3", HOUR, &[]).await.expect_err("capped");
    assert!(err.to_string().contains("max_instances = 2"), "{err}");
}
