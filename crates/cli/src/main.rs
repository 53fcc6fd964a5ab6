//! `p2pchat` binary.

fn main() {}
