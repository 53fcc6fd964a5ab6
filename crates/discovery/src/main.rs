//! `p2pchat-discovery` binary.

fn main() {}
