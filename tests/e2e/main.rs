//! The end-to-end test binary, one module per area, helpers in `util`.
//!
//! - `architecture`: the dependency direction of design.md §2.
//! - `chat`: the peer runtime against an in-process discovery server.
//! - `scripted`: the real binaries, driven through `p2pchat send` and `listen --json`.
//! - `outages`: discovery and Redis restarts and crashes, counting every message.
//! - `hostile_peer`: hostile clients against a peer's P2P listener (the real binary).

mod architecture;
mod chat;
mod hostile_peer;
mod outages;
mod scripted;
mod util;
