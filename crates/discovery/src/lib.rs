//! The p2pchat discovery server: authenticated registration, keep-alive presence, lookup,
//! the end-to-end encrypted mailbox relay, and operator announcements.
//!
//! - [`handler`]: [`Session`], the control protocol as a state machine over a [`store::Store`]
//!   with time passed in: every rule and error code lives there.
//! - [`server`]: [`run`]/[`serve`], the accept loop and one actor per connection; the
//!   [`server::Hub`] that routes pushes; the fan-out of store broadcasts (announcements,
//!   mail-waiting) to this instance's clients.
//! - [`presence`]: [`presence::Watching`], one session's watch set of contacts and the
//!   presence pushes it lets through (mutual contacts only, coalesced per contact).
//! - [`config`]: [`Config`], timeouts and limits.
//! - [`metrics`]: [`Metrics`], Prometheus text on `--metrics`.
//! - [`limits`]: the token bucket and the connection cap under the open-file limit;
//!   [`per_ip`]: the limits per source IP address; [`per_sender`]: each user's deposit
//!   budget.
//! - [`operator`]: the operator secret in the data dir, and the `announce` client.
//!
//! **Architecture Invariant:** the server never sees plaintext: it stores and forwards
//! sealed envelopes, names, keys and addresses. Only it talks to the store.

pub mod config;
pub mod handler;
pub mod limits;
pub mod metrics;
pub mod operator;
pub mod per_ip;
pub mod per_sender;
pub mod presence;
pub mod server;

pub use config::Config;
pub use handler::Session;
pub use metrics::Metrics;
pub use server::{run, serve};
