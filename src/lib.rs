//! udpvid: video files over a reliable, bandwidth-frugal UDP protocol.
//!
//! [`protocol`] is the sans-IO protocol core, shared by the server and the
//! element; it needs neither GStreamer nor an async runtime. With the `gst`
//! feature (default) the crate is also the GStreamer plugin `udpvid`,
//! providing the `udpvidsrc` element.

pub mod blocking_client;
pub mod discovery;
pub mod impairment;
pub mod location;
pub mod protocol;

#[cfg(feature = "gst")]
mod udpviddeviceprovider;
#[cfg(feature = "gst")]
mod udpvidsrc;

#[cfg(feature = "gst")]
pub use udpvidsrc::UdpVidSrc;

#[cfg(feature = "gst")]
fn plugin_init(plugin: &gst::Plugin) -> Result<(), gst::glib::BoolError> {
    udpvidsrc::register(plugin)?;
    udpviddeviceprovider::register(plugin)
}

#[cfg(feature = "gst")]
gst::plugin_define!(
    udpvid,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MPL",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
