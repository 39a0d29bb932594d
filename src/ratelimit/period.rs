//! Budget periods (CONTRACT §13): the UTC day or calendar month a token budget counts
//! in, numbered as `token_bucket.lua` numbers them, so the in-process limiter and the
//! script agree on when a budget starts again.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::settings::BudgetPeriod;
use crate::telemetry::log_format::civil_from_days;

/// The period holding a moment: its number (days since the epoch, or `year * 12 +
/// month - 1`), and its start and end in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The period's number.
    pub number: i64,
    /// First second of the period.
    pub start: i64,
    /// First second of the next period.
    pub end: i64,
}

impl Span {
    /// The span of `period` holding `unix_seconds`.
    pub fn at(period: BudgetPeriod, unix_seconds: i64) -> Span {
        let day = unix_seconds.div_euclid(86_400);
        match period {
            BudgetPeriod::Day => Span {
                number: day,
                start: day * 86_400,
                end: (day + 1) * 86_400,
            },
            BudgetPeriod::Month => {
                let (year, month, _) = civil_from_days(day);
                let month = month as i64;
                let (next_year, next_month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                Span {
                    number: year * 12 + month - 1,
                    start: days_from_civil(year, month, 1) * 86_400,
                    end: days_from_civil(next_year, next_month, 1) * 86_400,
                }
            }
        }
    }

    /// The span of `period` holding now.
    pub fn now(period: BudgetPeriod) -> Span {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Span::at(period, now)
    }

    /// The period's length in seconds.
    pub fn seconds(&self) -> u64 {
        (self.end - self.start) as u64
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`, the inverse of `civil_from_days`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_run_midnight_to_midnight_utc() {
        // 2026-12-01T13:00:00Z
        let span = Span::at(BudgetPeriod::Day, 1_796_130_000);
        assert_eq!(span.start, 1_796_083_200);
        assert_eq!(span.end, 1_796_169_600);
        assert_eq!(span.number, 20_788);
        assert_eq!(span.seconds(), 86_400);
    }

    #[test]
    fn months_are_calendar_months_leap_years_included() {
        // 2024-02-10: February of a leap year, 29 days.
        let feb = Span::at(BudgetPeriod::Month, 1_707_523_200);
        assert_eq!(feb.start, 1_706_745_600); // 2024-02-01
        assert_eq!(feb.end, 1_709_251_200); // 2024-03-01
        assert_eq!(feb.number, 2024 * 12 + 1);
        // 2026-12-31T23:59:59Z ends at the new year.
        let dec = Span::at(BudgetPeriod::Month, 1_798_761_599);
        assert_eq!(dec.end, 1_798_761_600);
        assert_eq!(dec.number, 2026 * 12 + 11);
        assert_eq!(Span::at(BudgetPeriod::Month, dec.end).number, 2027 * 12);
    }

    #[test]
    fn civil_dates_round_trip() {
        for day in [-800_000, -1, 0, 59, 10_957, 20_788, 2_000_000] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m as i64, d as i64), day);
        }
    }
}
