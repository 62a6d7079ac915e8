//! The element: GStreamer glue around [`BlockingClient`]. Nothing
//! protocol-shaped lives here; it maps properties, seeks and errors.

use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_src::CreateSuccess;
use gst_base::subclass::prelude::*;

use crate::blocking_client::{BlockingClient, WaitError};
use crate::protocol::client::{ClientConfig, DEFAULT_READ_AHEAD};
use crate::protocol::wire::{CloseReason, OpenErrorKind};

const DEFAULT_HOST: &str = "127.0.0.1";
/// The seed design's port; the server uses it by default too.
const DEFAULT_PORT: u32 = 50000;
const DEFAULT_TIMEOUT_SECS: u32 = 10;
/// Smallest read-ahead accepted: a few datagrams, or the transfer crawls.
const MIN_READ_AHEAD: u64 = 16 * 1024;
/// A forward seek this close is served by dropping buffered bytes instead
/// of asking the server to start again.
const LOCAL_SKIP_LIMIT: u64 = 4 * 1024 * 1024;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "udpvidsrc",
        gst::DebugColorFlags::empty(),
        Some("udpvid source"),
    )
});

#[derive(Debug, Clone)]
struct Settings {
    host: String,
    port: u32,
    file: Option<String>,
    read_ahead: u64,
    timeout: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT,
            file: None,
            read_ahead: DEFAULT_READ_AHEAD,
            timeout: DEFAULT_TIMEOUT_SECS,
        }
    }
}

impl Settings {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout as u64)
    }
    fn location(&self) -> String {
        format!(
            "udpvid://{}:{}/{}",
            self.host,
            self.port,
            self.file.as_deref().unwrap_or("")
        )
    }
}

#[derive(Default)]
enum State {
    #[default]
    Stopped,
    Started {
        /// Shared so `unlock` can cancel a wait without the state lock,
        /// which `create` must not hold while it blocks.
        client: Arc<BlockingClient>,
        size: u64,
        content_tag: u64,
        /// Offset of the next byte `create` returns without a seek.
        position: u64,
    },
}

#[derive(Default)]
pub struct UdpVidSrc {
    settings: Mutex<Settings>,
    state: Mutex<State>,
}

impl UdpVidSrc {
    fn settings(&self) -> MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns a failed wait into the element error a user can act on.
    fn error_message(
        &self,
        settings: &Settings,
        err: &WaitError,
        client: Option<&BlockingClient>,
    ) -> gst::ErrorMessage {
        let location = settings.location();
        match err {
            WaitError::Timeout { waited } => gst::error_msg!(
                gst::ResourceError::OpenRead,
                (
                    "No answer from udpvid server {}:{} for {:.1} s while reading {}: is the server running and reachable (UDP port {})?",
                    settings.host,
                    settings.port,
                    waited.as_secs_f64(),
                    location,
                    settings.port
                )
            ),
            WaitError::Open {
                kind: OpenErrorKind::NotFound,
                message,
            } => {
                let offered = client
                    .and_then(|c| c.catalog(settings.timeout()).ok())
                    .map(|entries| {
                        if entries.is_empty() {
                            "the server offers no files".to_string()
                        } else {
                            let names: Vec<&str> =
                                entries.iter().take(20).map(|e| e.name.as_str()).collect();
                            let more = entries.len().saturating_sub(20);
                            let mut s = format!("the server offers: {}", names.join(", "));
                            if more > 0 {
                                s.push_str(&format!(" and {more} more"));
                            }
                            s
                        }
                    })
                    .unwrap_or_else(|| "the catalog could not be fetched".to_string());
                gst::error_msg!(
                    gst::ResourceError::NotFound,
                    (
                        "File not found on udpvid server: {} ({}); {}",
                        location,
                        message,
                        offered
                    )
                )
            }
            WaitError::Open {
                kind: OpenErrorKind::NotReadable,
                message,
            } => gst::error_msg!(
                gst::ResourceError::NotAuthorized,
                ("The server cannot read {}: {}", location, message)
            ),
            WaitError::Open { kind, message } => gst::error_msg!(
                gst::ResourceError::OpenRead,
                ("The server refused {}: {}: {}", location, kind, message)
            ),
            WaitError::VersionMismatch { .. } => gst::error_msg!(
                gst::ResourceError::OpenRead,
                (
                    "Cannot talk to {}:{}: {}; upgrade the older side",
                    settings.host,
                    settings.port,
                    err
                )
            ),
            WaitError::Closed {
                reason: CloseReason::ServerBusy,
                ..
            } => gst::error_msg!(
                gst::ResourceError::Busy,
                (
                    "udpvid server {}:{} is busy; try again later ({})",
                    settings.host,
                    settings.port,
                    err
                )
            ),
            WaitError::Closed { .. } | WaitError::Protocol(_) => {
                gst::error_msg!(gst::ResourceError::Read, ("Lost {}: {}", location, err))
            }
            WaitError::Cancelled => gst::error_msg!(
                gst::ResourceError::Read,
                ("Reading {} was cancelled", location)
            ),
        }
    }

    /// Posts `err` (unless it is a cancellation) and turns it into a flow return.
    fn flow_error(&self, settings: &Settings, err: WaitError) -> gst::FlowError {
        if err == WaitError::Cancelled {
            gst::debug!(CAT, imp = self, "wait cancelled: flushing");
            return gst::FlowError::Flushing;
        }
        let msg = self.error_message(settings, &err, None);
        self.post_error_message(msg);
        gst::FlowError::Error
    }

    /// Moves the stream to `offset`: from the read-ahead when it is just
    /// ahead, otherwise by asking the server to start there.
    fn reposition(
        &self,
        client: &BlockingClient,
        settings: &Settings,
        path: &str,
        position: &mut u64,
        offset: u64,
    ) -> Result<(), gst::FlowError> {
        if let Some((current, ready)) = client.position() {
            if offset >= current && offset - current <= ready.min(LOCAL_SKIP_LIMIT) {
                let skipped = client.skip_buffered(offset - current);
                gst::debug!(
                    CAT,
                    imp = self,
                    "seek to {offset} served from the read-ahead ({skipped} bytes skipped)"
                );
                *position = offset;
                return Ok(());
            }
        }
        gst::debug!(CAT, imp = self, "seek to {offset}: asking the server");
        match client.open(path, offset, settings.timeout()) {
            Ok(_) => {
                *position = offset;
                Ok(())
            }
            Err(e) => Err(self.flow_error(settings, e)),
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for UdpVidSrc {
    const NAME: &'static str = "GstUdpVidSrc";
    type Type = super::UdpVidSrc;
    type ParentType = gst_base::BaseSrc;
}

impl ObjectImpl for UdpVidSrc {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("host")
                    .nick("Host")
                    .blurb("Name or address of the udpvid server")
                    .default_value(Some(DEFAULT_HOST))
                    .build(),
                glib::ParamSpecUInt::builder("port")
                    .nick("Port")
                    .blurb("UDP port of the udpvid server")
                    .minimum(1)
                    .maximum(u16::MAX as u32)
                    .default_value(DEFAULT_PORT)
                    .build(),
                glib::ParamSpecString::builder("file")
                    .nick("File")
                    .blurb("Path of the file to play, relative to the server's folder (see the server's catalog)")
                    .build(),
                glib::ParamSpecUInt64::builder("read-ahead")
                    .nick("Read-ahead")
                    .blurb("Bytes the server may send beyond what the pipeline has consumed; more survives longer outages, less wastes less when playback stops early")
                    .minimum(MIN_READ_AHEAD)
                    .default_value(DEFAULT_READ_AHEAD)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("timeout")
                    .nick("Timeout")
                    .blurb("Seconds without any answer from the server before reading fails with an error")
                    .minimum(1)
                    .maximum(3600)
                    .default_value(DEFAULT_TIMEOUT_SECS)
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let running = matches!(*self.state(), State::Started { .. });
        if running && pspec.name() != "read-ahead" {
            gst::warning!(
                CAT,
                imp = self,
                "changing {} has no effect while running",
                pspec.name()
            );
        }
        let mut settings = self.settings();
        match pspec.name() {
            "host" => {
                settings.host = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| DEFAULT_HOST.to_string())
            }
            "port" => settings.port = value.get().unwrap_or(DEFAULT_PORT),
            "file" => settings.file = value.get().ok().flatten(),
            "read-ahead" => {
                settings.read_ahead = value.get().unwrap_or(DEFAULT_READ_AHEAD);
                let read_ahead = settings.read_ahead;
                drop(settings);
                if let State::Started { client, .. } = &*self.state() {
                    client.set_read_ahead(read_ahead);
                }
            }
            "timeout" => settings.timeout = value.get().unwrap_or(DEFAULT_TIMEOUT_SECS),
            other => gst::warning!(CAT, imp = self, "unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let settings = self.settings();
        match pspec.name() {
            "host" => settings.host.to_value(),
            "port" => settings.port.to_value(),
            "file" => settings.file.to_value(),
            "read-ahead" => settings.read_ahead.to_value(),
            "timeout" => settings.timeout.to_value(),
            // GObject only asks for properties we declared.
            _ => glib::Value::from_type(pspec.value_type()),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.set_format(gst::Format::Bytes);
        obj.set_automatic_eos(false);
        obj.set_blocksize(64 * 1024);
    }
}

impl GstObjectImpl for UdpVidSrc {}

impl ElementImpl for UdpVidSrc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "udpvid source",
                "Source/Network",
                "Plays a video file from a udpvid server over reliable, bandwidth-frugal UDP",
                "udpvid developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &gst::Caps::new_any(),
                )
                .expect("valid pad template"),
            ]
        });
        TEMPLATES.as_ref()
    }
}

impl BaseSrcImpl for UdpVidSrc {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self.settings().clone();
        let Some(path) = settings.file.clone().filter(|f| !f.is_empty()) else {
            return Err(gst::error_msg!(
                gst::ResourceError::Settings,
                ("No file set: set the \"file\" property to a path from the server's catalog")
            ));
        };
        let port = u16::try_from(settings.port).map_err(|_| {
            gst::error_msg!(
                gst::ResourceError::Settings,
                ("Invalid port {}", settings.port)
            )
        })?;
        gst::info!(CAT, imp = self, "connecting to {}", settings.location());
        let client = BlockingClient::connect(
            &settings.host,
            port,
            ClientConfig {
                read_ahead: settings.read_ahead,
            },
        )
        .map_err(|e| {
            gst::error_msg!(
                gst::ResourceError::NotFound,
                (
                    "Cannot reach udpvid server {}:{}: {}",
                    settings.host,
                    settings.port,
                    e
                )
            )
        })?;
        let opened = match client.open(&path, 0, settings.timeout()) {
            Ok(o) => o,
            Err(e) => return Err(self.error_message(&settings, &e, Some(&client))),
        };
        gst::info!(
            CAT,
            imp = self,
            "opened {} ({} bytes) from {}",
            path,
            opened.size,
            client.server_addr()
        );
        *self.state() = State::Started {
            client: Arc::new(client),
            size: opened.size,
            content_tag: opened.content_tag,
            position: 0,
        };
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        let state = std::mem::take(&mut *self.state());
        if let State::Started {
            client,
            content_tag,
            ..
        } = state
        {
            let stats = client.stats();
            gst::info!(
                CAT,
                imp = self,
                "stopping (content tag {content_tag:016x}): {} data packets, {} duplicates, {} bytes received, {} delivered",
                stats.data_packets,
                stats.duplicate_packets,
                stats.bytes_received,
                stats.bytes_delivered
            );
            client.close();
        }
        Ok(())
    }

    fn is_seekable(&self) -> bool {
        true
    }

    fn size(&self) -> Option<u64> {
        match &*self.state() {
            State::Started { size, .. } => Some(*size),
            State::Stopped => None,
        }
    }

    fn query(&self, query: &mut gst::QueryRef) -> bool {
        if let gst::QueryViewMut::Scheduling(q) = query.view_mut() {
            // Push mode with byte seeks, as souphttpsrc: a demuxer's random
            // reads become seeks, which we serve from the read-ahead when close.
            q.set(gst::SchedulingFlags::SEEKABLE, 1, -1, 0);
            q.add_scheduling_modes([gst::PadMode::Push]);
            return true;
        }
        BaseSrcImplExt::parent_query(self, query)
    }

    fn do_seek(&self, segment: &mut gst::Segment) -> bool {
        let Some(segment) = segment.downcast_ref::<gst::format::Bytes>() else {
            gst::warning!(CAT, imp = self, "only byte seeks are supported");
            return false;
        };
        let offset = segment.start().map_or(0, |b| *b);
        let state = self.state();
        let State::Started { size, .. } = &*state else {
            // Before start the base class seeks to 0: nothing to do yet.
            return offset == 0;
        };
        if offset > *size {
            gst::warning!(CAT, imp = self, "seek to {offset} past the end ({size})");
            return false;
        }
        // The move itself happens in `create`, which gets the new offset and
        // can wait (and be cancelled) there.
        true
    }

    fn create(
        &self,
        offset: u64,
        _buffer: Option<&mut gst::BufferRef>,
        length: u32,
    ) -> Result<CreateSuccess, gst::FlowError> {
        let settings = self.settings().clone();
        let path = settings.file.clone().unwrap_or_default();
        let (client, size, mut position) = match &*self.state() {
            State::Started {
                client,
                size,
                position,
                ..
            } => (client.clone(), *size, *position),
            State::Stopped => {
                gst::element_imp_error!(
                    self,
                    gst::CoreError::Failed,
                    ("create called while not started")
                );
                return Err(gst::FlowError::Error);
            }
        };
        if offset >= size {
            return Err(gst::FlowError::Eos);
        }
        if offset != position {
            self.reposition(&client, &settings, &path, &mut position, offset)?;
        }
        let want = (length as u64).min(size - offset) as usize;
        let mut data = Vec::with_capacity(want);
        // Fill the whole request: demuxers expect full blocks except at the end.
        while data.len() < want {
            match client.read(want - data.len(), settings.timeout()) {
                Ok(Some(chunk)) => data.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => return Err(self.flow_error(&settings, e)),
            }
        }
        if data.is_empty() {
            return Err(gst::FlowError::Eos);
        }
        let end = offset + data.len() as u64;
        if let State::Started { position, .. } = &mut *self.state() {
            *position = end;
        }
        gst::trace!(CAT, imp = self, "pushing {} bytes at {offset}", data.len());
        let mut buffer = gst::Buffer::from_mut_slice(data);
        {
            let b = buffer.get_mut().ok_or(gst::FlowError::Error)?;
            b.set_offset(offset);
            b.set_offset_end(end);
        }
        Ok(CreateSuccess::NewBuffer(buffer))
    }

    fn unlock(&self) -> Result<(), gst::ErrorMessage> {
        if let State::Started { client, .. } = &*self.state() {
            client.cancel();
        }
        Ok(())
    }

    fn unlock_stop(&self) -> Result<(), gst::ErrorMessage> {
        if let State::Started { client, .. } = &*self.state() {
            client.resume();
        }
        Ok(())
    }
}
