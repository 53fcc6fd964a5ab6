//! [`Latencies`]: samples of one operation's duration, and their percentiles.

use std::time::Duration;

/// Recorded durations of one operation.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    nanos: Vec<u64>,
    sorted: bool,
}

impl Latencies {
    /// An empty record with room for `capacity` samples.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            nanos: Vec::with_capacity(capacity),
            sorted: true,
        }
    }

    /// Records one sample.
    pub fn record(&mut self, sample: Duration) {
        self.nanos
            .push(u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX));
        self.sorted = false;
    }

    /// Takes every sample of `other`.
    pub fn merge(&mut self, other: Latencies) {
        self.nanos.extend(other.nanos);
        self.sorted = false;
    }

    /// How many samples there are.
    pub fn len(&self) -> usize {
        self.nanos.len()
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.nanos.is_empty()
    }

    /// The `percent` percentile (nearest rank), or `None` without samples.
    pub fn percentile(&mut self, percent: f64) -> Option<Duration> {
        if self.nanos.is_empty() {
            return None;
        }
        if !self.sorted {
            self.nanos.sort_unstable();
            self.sorted = true;
        }
        let rank = ((percent / 100.0) * self.nanos.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.nanos.len()) - 1;
        Some(Duration::from_nanos(self.nanos[index]))
    }

    /// The `percent` percentile in microseconds (NaN without samples).
    pub fn percentile_us(&mut self, percent: f64) -> f64 {
        self.percentile(percent)
            .map_or(f64::NAN, |duration| duration.as_secs_f64() * 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut latencies = Latencies::default();
        for micros in (1..=100).rev() {
            latencies.record(Duration::from_micros(micros));
        }
        assert_eq!(latencies.percentile(50.0), Some(Duration::from_micros(50)));
        assert_eq!(latencies.percentile(99.0), Some(Duration::from_micros(99)));
        assert_eq!(
            latencies.percentile(100.0),
            Some(Duration::from_micros(100))
        );
        assert_eq!(Latencies::default().percentile(50.0), None);
    }
}
