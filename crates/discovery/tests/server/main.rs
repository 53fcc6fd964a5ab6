//! The discovery server over real loopback sockets, one module per area.

mod basics;
mod hostile;
mod util;
