//! The udpvid protocol, version 2, without any I/O.
//!
//! Everything here takes bytes and an `Instant` and returns bytes and
//! wake-up times; sockets, threads and clocks belong to the drivers (the
//! tokio server in `server/`, the element's network task in
//! `src/udpvidsrc/`). See `README.md` in this folder for the wire format.

pub mod address_map;
pub mod admission;
pub mod buffering;
pub mod catalog;
pub mod client;
pub mod congestion;
pub mod content_blocks;
pub mod cookie;
pub mod crypto;
#[doc(hidden)]
pub mod fuzzing;
pub mod media_index;
pub mod pacing;
pub mod ranges;
pub mod read_ahead;
pub mod receiver;
pub mod rtt;
pub mod sender;
mod sent_packets;
pub mod server;
mod session;
pub mod shared_bottleneck;
pub mod wire;

#[cfg(test)]
mod simulation;

#[cfg(test)]
mod robustness;

pub use catalog::CatalogEntry;
pub use client::{ClientConfig, ClientConnection, ClientEvent};
pub use server::{Content, ContentStore, OpenFailure, ServerConfig, ServerEndpoint, ServerEvent};
pub use wire::{CloseReason, OpenErrorKind, TransferKind};
