//! Time-of-day overrides of the idle target, as docker+machine's
//! `[[runners.machine.autoscaling]]` has them: cron expressions in a time zone.

use std::time::SystemTime;

use serde::Deserialize;

use crate::{Error, Result};

/// One override: while any of `periods` matches the current time in `timezone`, its values
/// replace the pool's (the last matching period wins).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Period {
    /// Cron expressions: `sec min hour day-of-month month day-of-week year` as docker+machine
    /// writes them (`* * 9-17 * * mon-fri *`), or the usual five fields (`min hour dom month
    /// dow`), or six (seconds first). A field is `*`, a number or name, a range `a-b`, a step
    /// `*/n` or `a-b/n`, or a comma list of those; day-of-week 0 and 7 are Sunday. When both
    /// day fields are restricted, both must match.
    pub periods: Vec<String>,
    /// An IANA time zone (`Europe/Berlin`); the runner host's own when missing.
    #[serde(default)]
    pub timezone: Option<String>,
    /// The idle target during the period.
    #[serde(default)]
    pub idle_count: Option<usize>,
    /// The idle time during the period, in seconds.
    #[serde(default)]
    pub idle_time: Option<u64>,
}

/// The fields, in the seven-field order, with their ranges and names.
const FIELDS: [(&str, i32, i32, &[&str]); 7] = [
    ("second", 0, 59, &[]),
    ("minute", 0, 59, &[]),
    ("hour", 0, 23, &[]),
    ("day of month", 1, 31, &[]),
    (
        "month",
        1,
        12,
        &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ],
    ),
    (
        "day of week",
        0,
        7,
        &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    ),
    ("year", 1970, 2199, &[]),
];

impl Period {
    /// Checks every expression and the time zone, with an error naming what to fix.
    pub fn validate(&self) -> Result<()> {
        self.zone()?;
        if self.periods.is_empty() {
            return Err(Error::system(
                "a [[driver.periods]] entry has no periods; give at least one cron expression",
            ));
        }
        for expression in &self.periods {
            fields(expression)?;
        }
        Ok(())
    }

    fn zone(&self) -> Result<jiff::tz::TimeZone> {
        match &self.timezone {
            None => Ok(jiff::tz::TimeZone::system()),
            Some(name) => jiff::tz::TimeZone::get(name).map_err(|err| {
                Error::system(format!(
                    "periods: unknown time zone {name:?} ({err}); use an IANA name such as Europe/Berlin"
                ))
            }),
        }
    }

    /// Whether the period is in force at `now` (an invalid one never is; settings are
    /// validated when loaded).
    pub fn matches(&self, now: SystemTime) -> bool {
        let (Ok(zone), Ok(now)) = (self.zone(), jiff::Timestamp::try_from(now)) else {
            return false;
        };
        let civil = now.to_zoned(zone);
        let values = [
            i32::from(civil.second()),
            i32::from(civil.minute()),
            i32::from(civil.hour()),
            i32::from(civil.day()),
            i32::from(civil.month()),
            i32::from(civil.weekday().to_sunday_zero_offset()),
            i32::from(civil.year()),
        ];
        self.periods.iter().any(|expression| {
            fields(expression).is_ok_and(|fields| {
                fields
                    .iter()
                    .zip(values)
                    .enumerate()
                    .all(|(index, (field, value))| {
                        // Sunday is 0 and 7.
                        field.contains(&value) || (index == 5 && value == 0 && field.contains(&7))
                    })
            })
        })
    }
}

/// The seven fields of `expression`, each the list of values it allows.
fn fields(expression: &str) -> Result<Vec<Vec<i32>>> {
    let given: Vec<&str> = expression.split_whitespace().collect();
    let all: Vec<&str> = match given.len() {
        5 => [&["*"][..], &given, &["*"]].concat(),
        6 => [&given[..], &["*"]].concat(),
        7 => given,
        n => {
            return Err(Error::system(format!(
                "periods: {expression:?} has {n} fields; write 5 (min hour dom month dow), 6 (with seconds first) or 7 (with the year last)"
            )));
        }
    };
    all.iter()
        .zip(FIELDS)
        .map(|(text, (name, low, high, names))| {
            field(text, low, high, names).ok_or_else(|| {
                Error::system(format!(
                    "periods: {expression:?}: the {name} field {text:?} is not valid (allowed: {low}-{high}, *, ranges, steps, lists)"
                ))
            })
        })
        .collect()
}

fn field(text: &str, low: i32, high: i32, names: &[&str]) -> Option<Vec<i32>> {
    let value = |text: &str| -> Option<i32> {
        let named = names
            .iter()
            .position(|name| name.eq_ignore_ascii_case(text))
            .and_then(|at| i32::try_from(at).ok())
            .map(|at| if low == 1 { at + 1 } else { at });
        let number = named.or_else(|| text.parse().ok())?;
        (low..=high).contains(&number).then_some(number)
    };
    let mut allowed = Vec::new();
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, step.parse::<i32>().ok().filter(|s| *s > 0)?),
            None => (item, 1),
        };
        let (from, to) = match range {
            "*" => (low, high),
            _ => match range.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                None if item.contains('/') => (value(range)?, high),
                None => (value(range)?, value(range)?),
            },
        };
        if from > to {
            return None;
        }
        allowed.extend((from..=to).step_by(usize::try_from(step).ok()?));
    }
    Some(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn period(expression: &str, zone: &str) -> Period {
        Period {
            periods: vec![expression.into()],
            timezone: Some(zone.into()),
            idle_count: Some(3),
            idle_time: None,
        }
    }

    fn at(text: &str) -> SystemTime {
        SystemTime::from(text.parse::<jiff::Timestamp>().expect("timestamp"))
    }

    #[test]
    fn office_hours_in_a_time_zone() {
        let office = period("* * 9-17 * * mon-fri *", "Europe/Berlin");
        office.validate().expect("valid");
        // Wednesday 2026-12-02 08:30 UTC is 09:30 in Berlin (CET, UTC+1).
        assert!(office.matches(at("2026-12-02T08:30:00Z")));
        // 07:30 UTC is 08:30 in Berlin: before the period.
        assert!(!office.matches(at("2026-12-02T07:30:00Z")));
        // Saturday.
        assert!(!office.matches(at("2026-12-05T10:00:00Z")));
        // In summer Berlin is UTC+2: 07:30 UTC is 09:30.
        assert!(office.matches(at("2026-07-01T07:30:00Z")));
    }

    #[test]
    fn five_fields_steps_lists_and_sunday_as_seven() {
        let p = period("*/15 0,12 * jan-mar 7", "UTC");
        p.validate().expect("valid");
        // Sunday 2026-01-04 12:30 UTC.
        assert!(p.matches(at("2026-01-04T12:30:00Z")));
        assert!(!p.matches(at("2026-01-04T12:31:00Z")));
        assert!(!p.matches(at("2026-04-05T12:30:00Z")));
    }

    #[test]
    fn bad_expressions_and_zones_say_what_to_fix() {
        let err = period("* 25 * * *", "UTC").validate().expect_err("hour 25");
        assert!(err.to_string().contains("hour field \"25\""), "{err}");
        let err = period("* * *", "UTC").validate().expect_err("three fields");
        assert!(err.to_string().contains("has 3 fields"), "{err}");
        let err = period("* * * * *", "Mars/Olympus")
            .validate()
            .expect_err("zone");
        assert!(err.to_string().contains("unknown time zone"), "{err}");
    }
}
