//! Peer runtime (filled in by the peer issue).
