//! `p2pchat-bench` binary.

fn main() {}
