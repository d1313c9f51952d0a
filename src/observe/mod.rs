//! Observing the kernel: decoding rtnetlink messages, the mirror they feed, and the sockets.

pub mod bpf;
pub mod decode;
pub mod events;
pub mod kernel;
pub mod mirror;
pub mod sysctl;

pub use mirror::{Change, Mirror, RouteInterest};
