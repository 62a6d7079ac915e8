//! `udpvidsrc`: plays a file from a udpvid server.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct UdpVidSrc(ObjectSubclass<imp::UdpVidSrc>) @extends gst_base::BaseSrc, gst::Element, gst::Object, @implements gst::URIHandler;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "udpvidsrc",
        gst::Rank::PRIMARY,
        UdpVidSrc::static_type(),
    )
}
