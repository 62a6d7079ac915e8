use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use crate::discovery::{DiscoveredServer, discover};

/// How long a probe collects answers to its multicast DNS query.
const PROBE_WAIT: Duration = Duration::from_millis(1500);

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "udpviddeviceprovider",
        gst::DebugColorFlags::empty(),
        Some("udpvid servers on the LAN"),
    )
});

#[derive(Default)]
pub struct UdpVidDeviceProvider;

#[glib::object_subclass]
impl ObjectSubclass for UdpVidDeviceProvider {
    const NAME: &'static str = "GstUdpVidDeviceProvider";
    type Type = super::UdpVidDeviceProvider;
    type ParentType = gst::DeviceProvider;
}

impl ObjectImpl for UdpVidDeviceProvider {}
impl GstObjectImpl for UdpVidDeviceProvider {}

impl DeviceProviderImpl for UdpVidDeviceProvider {
    fn metadata() -> Option<&'static gst::subclass::DeviceProviderMetadata> {
        static METADATA: LazyLock<gst::subclass::DeviceProviderMetadata> = LazyLock::new(|| {
            gst::subclass::DeviceProviderMetadata::new(
                "udpvid servers",
                "Source/Network",
                "Lists the udpvid servers announced on the LAN (DNS-SD _udpvid._udp)",
                "udpvid developers",
            )
        });
        Some(&*METADATA)
    }

    /// Monitoring: the servers found at start are added (a provider that
    /// does not start cannot be monitored at all). Servers appearing later
    /// show at the next start or probe.
    fn start(&self) -> Result<(), gst::LoggableError> {
        for device in self.probe() {
            self.obj().device_add(&device);
        }
        Ok(())
    }

    fn probe(&self) -> Vec<gst::Device> {
        match discover(PROBE_WAIT) {
            Ok(servers) => servers.iter().map(server_device).collect(),
            Err(e) => {
                gst::warning!(CAT, imp = self, "{e}");
                Vec::new()
            }
        }
    }
}

fn server_device(server: &DiscoveredServer) -> gst::Device {
    let properties = gst::Structure::builder("udpvid-server")
        .field("name", server.name.as_str())
        .field("host", server.address.to_string())
        .field("port", server.port as u32)
        .field("uri", server.uri())
        .build();
    let device: super::UdpVidServerDevice = glib::Object::builder()
        .property("display-name", server.name.as_str())
        .property("device-class", "Source/Network")
        // The bytes of a file: what they are, the demuxer finds out.
        .property("caps", gst::Caps::new_any())
        .property("properties", properties)
        .build();
    let _ = device.imp().server.set(server.clone());
    device.upcast()
}

#[derive(Default)]
pub struct UdpVidServerDevice {
    server: OnceLock<DiscoveredServer>,
}

#[glib::object_subclass]
impl ObjectSubclass for UdpVidServerDevice {
    const NAME: &'static str = "GstUdpVidServerDevice";
    type Type = super::UdpVidServerDevice;
    type ParentType = gst::Device;
}

impl ObjectImpl for UdpVidServerDevice {}
impl GstObjectImpl for UdpVidServerDevice {}

impl DeviceImpl for UdpVidServerDevice {
    fn create_element(&self, name: Option<&str>) -> Result<gst::Element, gst::LoggableError> {
        let server = self
            .server
            .get()
            .ok_or_else(|| gst::loggable_error!(CAT, "device without a server"))?;
        let mut builder = gst::ElementFactory::make("udpvidsrc")
            .property("host", server.address.to_string())
            .property("port", server.port as u32);
        if let Some(name) = name {
            builder = builder.name(name);
        }
        builder
            .build()
            .map_err(|e| gst::loggable_error!(CAT, "cannot make udpvidsrc: {e}"))
    }
}
