//! The end-to-end test binary: one module per area, helpers in `tests/lib.rs`.

mod architecture;
mod chat;
