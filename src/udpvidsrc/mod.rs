//! `udpvidsrc`: plays a file from a udpvid server.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct UdpVidSrc(ObjectSubclass<imp::UdpVidSrc>) @extends gst_base::BaseSrc, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "udpvidsrc",
        gst::Rank::NONE,
        UdpVidSrc::static_type(),
    )
}
