//! Latency samples and the figures a benchmark reports from them.
//!
//! Percentiles use the nearest-rank method: the p-th percentile of n sorted samples is the
//! sample of rank ⌈p/100 · n⌉. It always returns a latency that was actually observed, which
//! reads better in a report than an interpolated one, and with a few hundred samples the two
//! differ by less than the run-to-run noise. With fewer than 100 samples, p99 is the maximum.

use std::time::Duration;

/// The nearest-rank `p`-th percentile (0 < p ≤ 100) of `sorted`, which must be ascending.
/// `None` for no samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Latencies of one kind of operation, in the order they were recorded.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    durations: Vec<Duration>,
}

/// What a report says about a set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Samples {
    pub fn record(&mut self, d: Duration) {
        self.durations.push(d);
    }

    pub fn extend(&mut self, other: Samples) {
        self.durations.extend(other.durations);
    }

    pub fn len(&self) -> usize {
        self.durations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.durations.is_empty()
    }

    /// p50, p99, max and mean; `None` for no samples.
    pub fn summary(&self) -> Option<LatencySummary> {
        let mut sorted = self.durations.clone();
        sorted.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let total: Duration = sorted.iter().sum();
        Some(LatencySummary {
            count: sorted.len() as u64,
            p50_ms: ms(percentile(&sorted, 50.0)?),
            p99_ms: ms(percentile(&sorted, 99.0)?),
            max_ms: ms(*sorted.last()?),
            mean_ms: ms(total) / sorted.len() as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn nearest_rank_on_one_to_a_hundred() {
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(ms(50)));
        assert_eq!(percentile(&sorted, 99.0), Some(ms(99)));
        assert_eq!(percentile(&sorted, 100.0), Some(ms(100)));
        assert_eq!(percentile(&sorted, 1.0), Some(ms(1)));
    }

    #[test]
    fn small_and_empty_sets() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[ms(7)], 50.0), Some(ms(7)));
        assert_eq!(percentile(&[ms(7)], 99.0), Some(ms(7)));
        // Under 100 samples, p99 is the largest one.
        let sorted: Vec<Duration> = (1..=10).map(ms).collect();
        assert_eq!(percentile(&sorted, 99.0), Some(ms(10)));
        assert_eq!(percentile(&sorted, 50.0), Some(ms(5)));
        // p = 0 is clamped to the first rank rather than indexing before the start.
        assert_eq!(percentile(&sorted, 0.0), Some(ms(1)));
    }

    #[test]
    fn summary_sorts_what_was_recorded_out_of_order() {
        let mut s = Samples::default();
        for v in [9, 1, 5, 3, 7, 2, 8, 4, 6, 10] {
            s.record(ms(v));
        }
        let sum = s.summary().expect("samples");
        assert_eq!(sum.count, 10);
        assert_eq!(sum.p50_ms, 5.0);
        assert_eq!(sum.p99_ms, 10.0);
        assert_eq!(sum.max_ms, 10.0);
        assert!((sum.mean_ms - 5.5).abs() < 1e-9);
        assert_eq!(Samples::default().summary(), None);
    }
}
