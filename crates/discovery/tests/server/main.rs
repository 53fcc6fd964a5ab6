//! The discovery server over real loopback sockets, one module per area.

mod abuse;
mod basics;
mod hostile;
mod presence;
mod util;
