//! `udpviddeviceprovider`: the udpvid servers announced on the LAN (DNS-SD
//! `_udpvid._udp`), as GStreamer devices, so `gst-device-monitor-1.0` and
//! applications using `GstDeviceMonitor` see them as they see cameras and
//! sound cards. A device's element is a `udpvidsrc` pointed at the server;
//! the application picks the file (its catalog: the `catalog` property).

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct UdpVidDeviceProvider(ObjectSubclass<imp::UdpVidDeviceProvider>) @extends gst::DeviceProvider, gst::Object;
}

glib::wrapper! {
    pub struct UdpVidServerDevice(ObjectSubclass<imp::UdpVidServerDevice>) @extends gst::Device, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::DeviceProvider::register(
        Some(plugin),
        "udpviddeviceprovider",
        gst::Rank::SECONDARY,
        UdpVidDeviceProvider::static_type(),
    )
}
