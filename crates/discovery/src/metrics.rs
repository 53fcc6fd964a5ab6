//! [`Metrics`]: counters the server keeps, rendered as Prometheus text and served over plain
//! HTTP on `--metrics <addr>`.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use proto::ErrorCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

/// A monotonically increasing count (or, for gauges, one that also goes down).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `amount`.
    pub fn add(&self, amount: u64) {
        self.0.fetch_add(amount, Ordering::Relaxed);
    }

    /// Sets the value (gauges only).
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// Subtracts one (gauges only).
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of a [`Histogram`]'s buckets; one more bucket takes the rest.
pub const BUCKETS_SECONDS: [f64; 12] = [
    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// How long something took, counted into fixed buckets (rendered as a Prometheus
/// histogram): lock-free, a few atomic adds per observation.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is everything above the bounds.
    buckets: [Counter; BUCKETS_SECONDS.len() + 1],
    /// The sum of every observation, in microseconds.
    sum_micros: Counter,
}

impl Histogram {
    /// Counts one observation of `elapsed`.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let index = BUCKETS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS_SECONDS.len());
        self.buckets[index].inc();
        self.sum_micros
            .add(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    /// The observations in each bucket (not cumulative), in the order of
    /// [`BUCKETS_SECONDS`], then the ones above the last bound.
    pub fn buckets(&self) -> Vec<u64> {
        self.buckets.iter().map(Counter::get).collect()
    }

    /// How many observations were counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(Counter::get).sum()
    }

    /// Appends the `_bucket`, `_sum` and `_count` lines of `name` with `labels` (such as
    /// `op="lookup"`).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_SECONDS.iter().zip(&self.buckets) {
            cumulative += bucket.get();
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS_SECONDS.len()].get();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.get() as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Everything the server counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open client connections (gauge).
    pub connected: Counter,
    /// Successful registrations.
    pub registrations: Counter,
    /// Lookups served.
    pub lookups: Counter,
    /// Mail stored (duplicates excluded).
    pub mail_deposited: Counter,
    /// Mail acked by its recipient, and so delivered.
    pub mail_delivered: Counter,
    /// Connections refused at the connection limit.
    pub refused_connections: Counter,
    /// The connection cap in force (gauge): the configured cap, or less under the
    /// open-file limit.
    pub connection_cap: Counter,
    /// Failed accepts (out of file descriptors and the like); each backs off.
    pub accept_errors: Counter,
    /// Sessions closed to make room for a newer session of the same user.
    pub sessions_evicted: Counter,
    /// Presence pushes sent to clients about their mutual contacts.
    pub presence_pushes: Counter,
    /// Watch requests refused for passing the watch set's bound.
    pub watch_refused: Counter,
    /// `List` replies capped at the most names in a list.
    pub lists_capped: Counter,
    /// Connections closed at the registration deadline (no registration within the
    /// handshake timeout from accept).
    pub registration_timeouts: Counter,
    /// Connections closed for a frame over the limit before registration.
    pub preauth_oversized_frames: Counter,
    /// Connections refused at the per-IP connection limit.
    pub per_ip_refused_connections: Counter,
    /// Requests refused at the per-IP request rate.
    pub per_ip_rate_limited: Counter,
    /// Registrations of a new name refused at the per-IP limit of new names per hour.
    pub per_ip_names_refused: Counter,
    /// Deposits refused over their sender's budget (messages a minute or bytes an hour).
    pub deposits_over_budget: Counter,
    /// Deposits refused at the recipient's mailbox byte cap.
    pub mailbox_bytes_full: Counter,
    /// How long a heartbeat's presence write waited for the store.
    pub store_heartbeat: Histogram,
    /// How long a lookup's reads waited for the store.
    pub store_lookup: Histogram,
    errors: [Counter; ErrorCode::ALL.len()],
}

impl Metrics {
    /// Counts one error reply (or closing reason) with `code`.
    pub fn error(&self, code: ErrorCode) {
        if let Some(index) = ErrorCode::ALL.iter().position(|known| *known == code) {
            self.errors[index].inc();
        }
    }

    /// How many errors with `code` were counted.
    pub fn errors(&self, code: ErrorCode) -> u64 {
        ErrorCode::ALL
            .iter()
            .position(|known| *known == code)
            .map_or(0, |index| self.errors[index].get())
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let simple = [
            (
                "p2pchat_connected_clients",
                "gauge",
                "Open client connections.",
                &self.connected,
            ),
            (
                "p2pchat_registrations_total",
                "counter",
                "Successful registrations.",
                &self.registrations,
            ),
            (
                "p2pchat_lookups_total",
                "counter",
                "Lookups served.",
                &self.lookups,
            ),
            (
                "p2pchat_mail_deposited_total",
                "counter",
                "Mail stored.",
                &self.mail_deposited,
            ),
            (
                "p2pchat_mail_delivered_total",
                "counter",
                "Mail acked by its recipient.",
                &self.mail_delivered,
            ),
            (
                "p2pchat_refused_connections_total",
                "counter",
                "Connections refused at the limit.",
                &self.refused_connections,
            ),
            (
                "p2pchat_connection_cap",
                "gauge",
                "The connection cap in force (the configured one, or less under the open-file limit).",
                &self.connection_cap,
            ),
            (
                "p2pchat_accept_errors_total",
                "counter",
                "Failed accepts (out of file descriptors and the like), each followed by a back-off.",
                &self.accept_errors,
            ),
            (
                "p2pchat_sessions_evicted_total",
                "counter",
                "Sessions closed to make room for a newer session of the same user over the per-user limit.",
                &self.sessions_evicted,
            ),
            (
                "p2pchat_presence_pushes_total",
                "counter",
                "Presence pushes sent to clients about their mutual contacts.",
                &self.presence_pushes,
            ),
            (
                "p2pchat_watch_refused_total",
                "counter",
                "Watch requests refused for passing the watch set's bound.",
                &self.watch_refused,
            ),
            (
                "p2pchat_lists_capped_total",
                "counter",
                "List replies capped at the most names in a list (with a count of the rest).",
                &self.lists_capped,
            ),
            (
                "p2pchat_registration_timeouts_total",
                "counter",
                "Connections closed for not registering within the handshake timeout from accept.",
                &self.registration_timeouts,
            ),
            (
                "p2pchat_preauth_oversized_frames_total",
                "counter",
                "Connections closed for a frame over the limit before registration.",
                &self.preauth_oversized_frames,
            ),
            (
                "p2pchat_per_ip_refused_connections_total",
                "counter",
                "Connections refused at the per-IP connection limit.",
                &self.per_ip_refused_connections,
            ),
            (
                "p2pchat_per_ip_rate_limited_total",
                "counter",
                "Requests refused at the per-IP request rate (all connections of one address together).",
                &self.per_ip_rate_limited,
            ),
            (
                "p2pchat_per_ip_names_refused_total",
                "counter",
                "Registrations of a new name refused at the per-IP limit of new names per hour.",
                &self.per_ip_names_refused,
            ),
            (
                "p2pchat_deposits_over_budget_total",
                "counter",
                "Deposits refused over their sender's budget (messages a minute or bytes an hour into others' mailboxes).",
                &self.deposits_over_budget,
            ),
            (
                "p2pchat_mailbox_bytes_full_total",
                "counter",
                "Deposits refused at the recipient's mailbox byte cap.",
                &self.mailbox_bytes_full,
            ),
        ];
        for (name, kind, help, counter) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                counter.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP p2pchat_store_seconds Time spent waiting for the store, by request.\n# TYPE p2pchat_store_seconds histogram"
        );
        for (op, histogram) in [
            ("heartbeat", &self.store_heartbeat),
            ("lookup", &self.store_lookup),
        ] {
            histogram.render(&mut out, "p2pchat_store_seconds", &format!("op=\"{op}\""));
        }
        let _ = writeln!(
            out,
            "# HELP p2pchat_errors_total Error replies by code.\n# TYPE p2pchat_errors_total counter"
        );
        for (code, counter) in ErrorCode::ALL.iter().zip(&self.errors) {
            let _ = writeln!(
                out,
                "p2pchat_errors_total{{code=\"{code}\"}} {}",
                counter.get()
            );
        }
        out
    }
}

/// The most metrics requests answered at once; a connection beyond it is closed at once.
/// Scrapers make one request every few seconds, so this only bounds a flood.
pub const MAX_METRICS_CONNECTIONS: usize = 16;

/// Serves [`Metrics::render`] to every HTTP request on `listener` until `shutdown`. Each
/// request is answered by a task this function owns (at most [`MAX_METRICS_CONNECTIONS`]
/// at once); they end with it.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut answering = tokio::task::JoinSet::new();
    loop {
        let (mut stream, _) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            Some(_) = answering.join_next(), if !answering.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little rather than spin
                    // (and log) on an error that repeats at once.
                    tracing::warn!(%error, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if answering.len() >= MAX_METRICS_CONNECTIONS {
            tracing::debug!("metrics connection refused: too many at once");
            continue;
        }
        let metrics = Arc::clone(&metrics);
        answering.spawn(async move {
            // Read the request head (bounded in size and time), then answer and close.
            let mut head = Vec::with_capacity(512);
            let read_head = async {
                let mut buffer = [0u8; 512];
                while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), read_head).await;
            let body = metrics.render();
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                stream.write_all(response.as_bytes()),
            )
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_renders_cumulative_buckets_its_sum_and_count() {
        let histogram = Histogram::default();
        for micros in [100, 250, 700, 3_000, 2_000_000] {
            histogram.observe(Duration::from_micros(micros));
        }
        assert_eq!(histogram.count(), 5);
        let mut out = String::new();
        histogram.render(&mut out, "t_seconds", "op=\"x\"");
        let line = |le: &str| {
            out.lines()
                .find(|line| {
                    line.starts_with(&format!("t_seconds_bucket{{op=\"x\",le=\"{le}\"}} "))
                })
                .unwrap_or_else(|| panic!("no bucket {le} in\n{out}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        // 100 and 250 µs fall in the first bucket (bounds are inclusive), 700 µs by 1 ms,
        // 3 ms by 5 ms, and two seconds only in +Inf.
        assert_eq!(line("0.00025"), 2);
        assert_eq!(line("0.0005"), 2);
        assert_eq!(line("0.001"), 3);
        assert_eq!(line("0.005"), 4);
        assert_eq!(line("1"), 4);
        assert_eq!(line("+Inf"), 5);
        assert!(out.contains("t_seconds_count{op=\"x\"} 5\n"), "{out}");
        assert!(out.contains("t_seconds_sum{op=\"x\"} 2.00405\n"), "{out}");
    }

    #[test]
    fn the_exposition_has_the_store_histograms() {
        let metrics = Metrics::default();
        metrics.store_lookup.observe(Duration::from_millis(3));
        let out = metrics.render();
        assert!(
            out.contains("# TYPE p2pchat_store_seconds histogram\n"),
            "{out}"
        );
        assert!(
            out.contains("p2pchat_store_seconds_count{op=\"lookup\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("p2pchat_store_seconds_count{op=\"heartbeat\"} 0\n"),
            "{out}"
        );
    }
}
