//! Retrying transient backend errors with exponential backoff and jitter, bounded by a
//! deadline and by cancellation.
//!
//! Only errors marked [`Error::transient`] are tried again; everything else fails at once, so
//! a wrong image name is not retried for minutes.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result, progress};

/// How to back off between attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay before the second attempt (before jitter).
    pub initial: Duration,
    /// Largest delay between two attempts.
    pub max: Duration,
    /// Most attempts in all.
    pub max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
            max_attempts: 8,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt + 1` (`attempt` counts from 1): exponential, capped,
    /// with "equal jitter" (half fixed, half random) so concurrent jobs that failed together
    /// do not retry together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponential = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.max);
        let half = exponential / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Runs `operation` until it succeeds, fails with a non-transient error, runs out of attempts,
/// would pass `deadline`, or `cancel` fires. Each retry is announced in the job log (stderr)
/// with its reason, so a slow start is never silent.
pub async fn retry<T, F, Fut>(
    what: &str,
    backoff: Backoff,
    deadline: Option<Instant>,
    cancel: &CancellationToken,
    mut operation: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        let err = match operation().await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        if !err.is_transient() || attempt >= backoff.max_attempts {
            return Err(err);
        }
        let delay = backoff.delay(attempt);
        if deadline.is_some_and(|d| Instant::now() + delay > d) {
            return Err(err.context(format!("{what}: gave up after {attempt} attempt(s)")));
        }
        progress(format_args!(
            "{what} failed ({err}); retrying in {:.1} s",
            delay.as_secs_f64()
        ));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return Err(Error::system(format!("{what}: cancelled"))),
        }
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn fast() -> Backoff {
        Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(4),
            max_attempts: 5,
        }
    }

    #[test]
    fn delays_grow_exponentially_within_the_cap_and_keep_half() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            max_attempts: 10,
        };
        for _ in 0..50 {
            let first = backoff.delay(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let fourth = backoff.delay(4);
            assert!(fourth >= Duration::from_millis(400) && fourth <= Duration::from_millis(800));
            assert!(backoff.delay(30) <= Duration::from_millis(1000));
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = Cell::new(0);
        let value = retry("ping", fast(), None, &CancellationToken::new(), || async {
            calls.set(calls.get() + 1);
            if calls.get() < 3 {
                Err(Error::transient("busy"))
            } else {
                Ok(7)
            }
        })
        .await
        .expect("third attempt succeeds");
        assert_eq!((value, calls.get()), (7, 3));
    }

    #[tokio::test]
    async fn permanent_errors_and_exhausted_attempts_stop() {
        let calls = Cell::new(0);
        let err = retry("pull", fast(), None, &CancellationToken::new(), || async {
            calls.set(calls.get() + 1);
            Err::<(), _>(Error::system("no such image"))
        })
        .await
        .expect_err("permanent");
        assert_eq!(
            (calls.get(), err.to_string().as_str()),
            (1, "no such image")
        );

        calls.set(0);
        retry("ping", fast(), None, &CancellationToken::new(), || async {
            calls.set(calls.get() + 1);
            Err::<(), _>(Error::transient("busy"))
        })
        .await
        .expect_err("exhausted");
        assert_eq!(calls.get(), 5);
    }

    #[tokio::test]
    async fn the_deadline_bounds_the_retries() {
        let backoff = Backoff {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(60),
            ..fast()
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        let err = retry(
            "ping",
            backoff,
            Some(deadline),
            &CancellationToken::new(),
            || async { Err::<(), _>(Error::transient("busy")) },
        )
        .await
        .expect_err("deadline");
        assert!(err.to_string().contains("gave up after 1 attempt"), "{err}");
    }
}
