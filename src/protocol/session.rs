//! One client's session on the server: its transfer of a file (or of the
//! catalog), the recovery and congestion state of what it sent, and what
//! it sends next. The endpoint (`server.rs`) admits sessions, routes
//! datagrams to them, answers statelessly and takes them in turns; a
//! session knows only its own client, as quinn-proto's `Connection` does
//! beside its `Endpoint`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::content_blocks::{BlockPool, BlockReader, ReadOrder};
use super::crypto::{SessionKeys, TAG_LEN};
use super::sender::{DataSent, LossRecovery, RecoveryOutcome, SentPacket, StreamSender};
use super::server::{
    AMPLIFICATION_FACTOR, Content, MIN_UNVALIDATED_PAYLOAD, OpenFailure, ServerEvent,
    SharedPayload, UNVALIDATED_TIMEOUT,
};
use super::shared_bottleneck::{
    GROUP_SILENT_AFTER, GROUP_SILENT_FLOOR, GROUP_SILENT_PROBE_TIMEOUTS,
};
use super::wire::{
    AckRange, Body, CloseReason, ConnectionId, DATA_OVERHEAD, OpenErrorKind, OpenRequest, Packet,
    TransferKind,
};

/// A session that lost more than this share of its packets sends each
/// resend twice (see `StreamSender::set_resend_twice`)...
const RESEND_TWICE_LOSS_SHARE: f64 = 0.03;
/// ...once it sent this many, so a few early losses do not decide it.
const RESEND_TWICE_AFTER_PACKETS: u64 = 200;

/// The file (or catalog) a session sends: the newest Open's.
pub(super) struct Transfer {
    pub(super) id: u32,
    pub(super) path: String,
    pub(super) content: Box<dyn Content>,
    pub(super) blocks: BlockReader,
    pub(super) stream: StreamSender,
    pub(super) complete_reported: bool,
    /// A read would block: nothing is sent until content arrives.
    pub(super) waiting_for_content: bool,
}

/// A session that sent nothing for this long, with nothing in flight and
/// its transfer at the client's window, belongs to a paused player: when
/// its keepalive comes, it gives back its read block and its in-flight
/// ring (`load paused 2000 60`: 111 -> 43 KiB of RSS per paused session).
const PAUSED_SESSION_IDLE: Duration = Duration::from_secs(2);

/// One client's session: its address, keys and address validation, its
/// transfer, and the recovery and congestion state of what it sent.
pub(super) struct Session {
    pub(super) id: ConnectionId,
    pub(super) addr: SocketAddr,
    pub(super) client_nonce: u64,
    pub(super) last_activity: Instant,
    pub(super) next_packet_number: u64,
    pub(super) recovery: LossRecovery,
    pub(super) transfer: Option<Transfer>,
    /// The reply to the newest Open, resent when the Open is repeated.
    pub(super) last_open_reply: Option<(u32, Body)>,
    pub(super) control: VecDeque<Body>,
    pub(super) bytes_sent: u64,
    pub(super) closing: Option<CloseReason>,
    /// Repeated when the Hello is repeated.
    pub(super) welcome: Body,
    pub(super) keys: Option<SessionKeys>,
    /// The client proved its address: a valid cookie, or a packet carrying
    /// the connection id only the Welcome told it. Until then the session
    /// may send at most [`AMPLIFICATION_FACTOR`] × `received_unvalidated`.
    pub(super) validated: bool,
    pub(super) received_unvalidated: usize,
    /// The file whose index this session was sent ahead: a demuxer parses
    /// the index once, so a later open of the same file (a seek) does not
    /// get it again.
    pub(super) index_sent_for: Option<String>,
    /// In the endpoint's queue of sessions that may have something to send.
    pub(super) ready: bool,
    /// Out of that queue with data to send, held back by its window (not
    /// by pacing): only an ACK lets it send again.
    pub(super) awaits_ack: bool,
    /// This session's entry in the endpoint's timer heap; older entries
    /// there are stale and skipped.
    pub(super) timer_at: Option<Instant>,
    /// Its next deadline as last computed (see `next_deadline`): the entry
    /// may be earlier (see `ServerEndpoint::reschedule`).
    pub(super) deadline: Option<Instant>,
    pub(super) large: LargeDatagrams,
    /// Its bytes in flight as last counted in its address group's total
    /// (see `ServerEndpoint::recount`).
    pub(super) counted_in_flight: u64,
    /// Its client went silent, as of the endpoint's last refresh (see
    /// [`Session::is_silent`]): out of its address group.
    pub(super) silent: bool,
    /// Its address group's rate level and, if its turns are held to one,
    /// window, as of the endpoint's last refresh (see
    /// `ServerEndpoint::refresh_group_windows`): asked at every turn and
    /// every send, they were two hash lookups each.
    pub(super) group_level: Option<f64>,
    pub(super) group_window: Option<u64>,
    /// Its turn waits for room in its address group's window.
    pub(super) group_held: bool,
    /// In its group's queue of held sessions (maybe no longer held).
    pub(super) group_queued: bool,
}

/// A transfer sends this much of its file in Ethernet-sized datagrams
/// before it tries a large one. A lost trial holds back every byte after
/// it for a round trip and more, and the first megabyte is what a player
/// waits for to start (the bench clip's preroll took 0.6 MB): through a
/// proxy of 1,500-byte packets on loopback at 20 Mbit/s and 80 ms the
/// trial, lost in the third round trip, held the stream for two, and a
/// `playbin` start reached 100 % after 0.73-0.81 s instead of 0.67-0.71
/// (eight starts, eighteen). On loopback itself the trial, which gets
/// through, now waits for the first megabyte too.
pub(super) const LARGE_DATAGRAM_TRIAL_AFTER: u64 = 1 << 20;

/// Datagrams larger than Ethernet's, for a client that says its route to
/// the server carries them (loopback, jumbo frames): per datagram, the
/// work of both ends is most of a fast transfer's cost. The client knows
/// only its own interface, so one datagram of that size goes first, new
/// data and nothing else; once acknowledged every datagram may be that
/// large, and once lost (a router further on carries less) none is. Its
/// loss is not the path's congestion, as RFC 8899 §4.2 has it for
/// probes: the controller is not told of it.
///
/// The trial waits until the transfer sent [`LARGE_DATAGRAM_TRIAL_AFTER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LargeDatagrams {
    /// Not offered, not allowed, or the trial was lost.
    Off,
    /// The next datagram that can be this large is the trial.
    Untried(usize),
    /// The trial is in flight (its `SentPacket` says `trial`).
    Trying(usize),
    /// The path carries them.
    InUse(usize),
}

impl Session {
    /// Bytes an unvalidated session may still send; `None` once validated.
    pub(super) fn amplification_budget(&self) -> Option<usize> {
        (!self.validated).then(|| {
            (self.received_unvalidated * AMPLIFICATION_FACTOR)
                .saturating_sub(self.bytes_sent as usize)
        })
    }

    /// An unvalidated session has no budget left for a useful datagram.
    pub(super) fn amplification_blocked(&self) -> bool {
        self.amplification_budget()
            .is_some_and(|b| b < DATA_OVERHEAD + MIN_UNVALIDATED_PAYLOAD)
    }

    /// When the session is dropped if nothing more is heard from it.
    pub(super) fn expires_at(&self, idle_timeout: Duration) -> Instant {
        let limit = if self.validated {
            idle_timeout
        } else {
            idle_timeout.min(UNVALIDATED_TIMEOUT)
        };
        self.last_activity + limit
    }

    /// Whether the client went silent (see [`GROUP_SILENT_PROBE_TIMEOUTS`]).
    pub(super) fn is_silent(&self, now: Instant) -> bool {
        let span = (self.recovery.rtt().probe_timeout() * GROUP_SILENT_PROBE_TIMEOUTS)
            .clamp(GROUP_SILENT_FLOOR, GROUP_SILENT_AFTER);
        now.saturating_duration_since(self.last_activity) >= span
    }

    /// Data waits to leave that only the window or pacing holds back: not
    /// a read of its content, nor the unproven address's budget.
    pub(super) fn has_data_for_the_network(&self) -> bool {
        !self.amplification_blocked()
            && self
                .transfer
                .as_ref()
                .is_some_and(|t| !t.waiting_for_content && t.stream.has_data_to_send())
    }

    /// The session's next deadline: the idle expiry, the loss-recovery
    /// timer, and, for data held back only by pacing, when it may leave.
    pub(super) fn next_deadline(&self, idle_timeout: Duration) -> Instant {
        let mut next = self.expires_at(idle_timeout);
        if let Some(t) = self.recovery.timeout() {
            next = next.min(t);
        }
        // A held turn waits for its group's ACKs, not its pacer.
        if self.has_data_for_the_network() && !self.group_held {
            if let Some(t) = self.recovery.pacing_deadline() {
                next = next.min(t);
            }
        }
        next
    }

    pub(super) fn next_pn(&mut self) -> u64 {
        let pn = self.next_packet_number;
        self.next_packet_number += 1;
        pn
    }

    /// Whether the Open of `transfer_id` was answered already: a repeated
    /// Open (its reply was lost) gets the reply again, an older one
    /// (reordered: the client has moved on) nothing.
    pub(super) fn answered_open(&mut self, transfer_id: u32) -> bool {
        let Some((last_id, reply)) = &self.last_open_reply else {
            return false;
        };
        if transfer_id == *last_id {
            self.control.push_back(reply.clone());
            return true;
        }
        transfer_id < *last_id
    }

    /// Starts the transfer an Open asked for, with the content the store
    /// opened (or its refusal), and queues the reply.
    pub(super) fn start_transfer(
        &mut self,
        now: Instant,
        request: OpenRequest,
        opened: Result<Box<dyn Content>, OpenFailure>,
    ) -> ServerEvent {
        let OpenRequest {
            transfer_id,
            kind,
            offset,
            window,
            path,
        } = request;
        // Whatever happens, the previous transfer's bytes are no longer wanted.
        self.transfer = None;
        self.recovery.discard_other_transfers(now, transfer_id);
        // A trial of the old transfer is forgotten with it, neither acked
        // nor lost: the new one tries again.
        if let LargeDatagrams::Trying(size) = self.large {
            self.large = LargeDatagrams::Untried(size);
        }
        match opened {
            Ok(content) => {
                let size = content.size();
                let start = offset.min(size);
                // The index goes ahead unless the demuxer's first reads
                // include it. Even inside the window it is worth it: the
                // client jumps locally only a short way, and the stream
                // reaches the end of the window last.
                let index = match kind {
                    TransferKind::File if self.index_sent_for.as_deref() != Some(&path) => content
                        .media_index()
                        .filter(|i| i.range.start > start.saturating_add(i.head)),
                    _ => None,
                };
                let mut stream = StreamSender::new(start, size, window);
                if let Some(i) = &index {
                    stream.send_ahead(i.range.clone(), i.head);
                    self.index_sent_for = Some(path.clone());
                }
                let reply = Body::OpenOk {
                    transfer_id,
                    size,
                    content_tag: content.tag(),
                    offset: start,
                    index: index.map(|i| i.range),
                };
                self.control.push_back(reply.clone());
                self.last_open_reply = Some((transfer_id, reply));
                self.transfer = Some(Transfer {
                    id: transfer_id,
                    path: path.clone(),
                    content,
                    blocks: BlockReader::default(),
                    stream,
                    complete_reported: false,
                    waiting_for_content: false,
                });
                ServerEvent::TransferStarted {
                    id: self.id,
                    kind,
                    path,
                    offset: start,
                    size,
                }
            }
            Err(failure) => {
                let reply = Body::OpenError {
                    transfer_id,
                    kind: failure.kind,
                    message: failure.message.clone(),
                };
                self.control.push_back(reply.clone());
                self.last_open_reply = Some((transfer_id, reply));
                ServerEvent::OpenRefused {
                    id: self.id,
                    path,
                    kind: failure.kind,
                    detail: failure.detail,
                }
            }
        }
    }

    /// An ACK from the client: what it acknowledged and what that shows
    /// lost (not yet applied to the transfer, see [`Self::apply_recovery`]).
    pub(super) fn on_ack(
        &mut self,
        now: Instant,
        transfer_id: u32,
        window: u64,
        received_up_to: u64,
        ack_delay: Duration,
        ranges: &[AckRange],
    ) -> RecoveryOutcome {
        if let Some(t) = self.transfer.as_mut().filter(|t| t.id == transfer_id) {
            t.stream.update_window(window);
            t.stream.on_received_up_to(received_up_to);
        }
        let outcome = self.recovery.on_ack_received(now, ranges, ack_delay);
        if !outcome.acked.is_empty() || !outcome.lost.is_empty() {
            return outcome;
        }
        // An ACK that acknowledges nothing new is a waiting client's (its
        // ACK repeat while bytes below its window are missing): it earns a
        // probe as its ping does, without waiting for a probe timer backed
        // off to seconds.
        self.recovery
            .on_peer_waiting(now, |p| still_needed(&self.transfer, p))
    }

    /// The loss timer or the probe timeout fired: what it declared lost
    /// and what probes wait (not yet applied, see [`Self::apply_recovery`]).
    pub(super) fn on_recovery_timeout(&mut self, now: Instant) -> RecoveryOutcome {
        self.recovery
            .on_timeout(now, |p| still_needed(&self.transfer, p))
    }

    /// A Ping from the client: a Pong, and a probe if what is in flight
    /// may be lost (returns whether one waits). A paused player's session
    /// gives back its read block and its in-flight ring.
    pub(super) fn on_ping(&mut self, now: Instant, block_pool: &mut BlockPool) -> bool {
        self.control.push_back(Body::Pong);
        if self.recovery.is_idle_for(now, PAUSED_SESSION_IDLE) {
            if let Some(t) = self
                .transfer
                .as_mut()
                .filter(|t| t.stream.is_window_blocked())
            {
                t.blocks.release(block_pool);
                self.recovery.release_memory();
            }
        }
        let outcome = self
            .recovery
            .on_peer_waiting(now, |p| still_needed(&self.transfer, p));
        let probe = !outcome.probe.is_empty();
        self.apply_recovery(outcome);
        probe
    }

    pub(super) fn apply_recovery(&mut self, outcome: RecoveryOutcome) {
        if let LargeDatagrams::Trying(size) = self.large {
            let is_trial = |p: &SentPacket| p.trial;
            if outcome.acked.iter().any(is_trial) {
                self.large = LargeDatagrams::InUse(size);
                self.recovery.set_max_datagram(size as u64);
            } else if outcome
                .lost
                .iter()
                .chain(outcome.probe.iter())
                .any(is_trial)
            {
                self.large = LargeDatagrams::Off;
            }
        }
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        if !outcome.lost.is_empty() {
            let stats = self.recovery.stats();
            t.stream.set_resend_twice(
                stats.packets_sent >= RESEND_TWICE_AFTER_PACKETS
                    && stats.packets_lost as f64
                        > stats.packets_sent as f64 * RESEND_TWICE_LOSS_SHARE,
            );
        }
        // Index sent ahead lives apart on the client: its ACK does not
        // mean the stream holds those bytes.
        for p in outcome
            .acked
            .iter()
            .filter(|p| p.transfer_id == t.id && !p.ahead)
        {
            t.stream.on_acked(p.range.clone());
        }
        for p in outcome
            .lost
            .iter()
            .chain(outcome.probe.iter())
            .filter(|p| p.transfer_id == t.id)
        {
            if p.ahead {
                t.stream.on_ahead_lost(p.range.clone());
            } else {
                t.stream.on_lost(p.range.clone());
            }
        }
    }

    pub(super) fn check_complete(&mut self, events: &mut VecDeque<ServerEvent>) {
        if let Some(t) = self.transfer.as_mut() {
            if !t.complete_reported && t.stream.is_complete() {
                t.complete_reported = true;
                events.push_back(ServerEvent::TransferComplete {
                    id: self.id,
                    path: t.path.clone(),
                });
            }
        }
    }

    /// The session's next datagram, appended to `out`: its Close if it is
    /// closing, else a control message, then data as its window, pacing and the client's window let
    /// it. `starting`: the first datagram of the session's turn, which
    /// waits for room for a whole burst (`LossRecovery::can_start_burst`).
    /// `default_payload`: the server's payload size where no larger one is
    /// in use. A file's bytes go to `payloads` when given (see
    /// [`super::server::ServerEndpoint::poll_transmit_vectored`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn poll_transmit(
        &mut self,
        now: Instant,
        default_payload: usize,
        block_pool: &mut BlockPool,
        out: &mut Vec<u8>,
        payloads: Option<&mut Vec<SharedPayload>>,
        starting: bool,
        events: &mut VecDeque<ServerEvent>,
    ) -> Transmit {
        let start = out.len();
        if let Some(reason) = self.closing {
            let pn = self.next_pn();
            Packet::new(
                self.id,
                pn,
                Body::Close {
                    reason,
                    message: reason.to_string(),
                },
            )
            .encode_append(out);
            if let Some(keys) = &self.keys {
                keys.seal_from(out, start);
            }
            return Transmit::Closed(self.addr, reason);
        }
        if self.amplification_blocked() {
            return Transmit::Nothing;
        }
        if let Some(body) = self.control.pop_front() {
            // The Welcome is authenticated by its tag; the client has no
            // keys before it.
            let seal = !matches!(body, Body::Welcome { .. });
            Packet::new(self.id, self.next_packet_number, body.clone()).encode_append(out);
            if let (true, Some(keys)) = (seal, &self.keys) {
                keys.seal_from(out, start);
            }
            if self
                .amplification_budget()
                .is_some_and(|b| out.len() - start > b)
            {
                // It waits for the client's proof of address.
                self.control.push_front(body);
                out.truncate(start);
                return Transmit::Nothing;
            }
            self.next_pn();
            self.bytes_sent += (out.len() - start) as u64;
            return Transmit::Sent(self.addr);
        }
        let tag_len = if self.keys.is_some() { TAG_LEN } else { 0 };
        let mut max_payload = match self.large {
            LargeDatagrams::InUse(size) => size - DATA_OVERHEAD,
            _ => default_payload,
        } - tag_len;
        if let Some(budget) = self.amplification_budget() {
            max_payload = max_payload.min(budget.saturating_sub(DATA_OVERHEAD + tag_len));
            if max_payload < MIN_UNVALIDATED_PAYLOAD {
                return Transmit::Nothing;
            }
        }
        let Some(t) = self.transfer.as_mut() else {
            return Transmit::Nothing;
        };
        if t.waiting_for_content || !t.stream.has_data_to_send() {
            return Transmit::Nothing;
        }
        let may_send = |recovery: &mut LossRecovery, payload: usize| {
            let size = (payload + DATA_OVERHEAD) as u64;
            if starting {
                recovery.can_start_burst(now, size)
            } else {
                recovery.can_send(now, size)
            }
        };
        // The trial needs a whole datagram of new data and room for it,
        // and the transfer past its start; until then datagrams stay small.
        let mut trial = None;
        if let LargeDatagrams::Untried(size) = self.large {
            let payload = size - DATA_OVERHEAD - tag_len;
            if self.validated
                && t.stream.new_data_sent() >= LARGE_DATAGRAM_TRIAL_AFTER
                && t.stream.has_new_data_run(payload as u64)
                && may_send(&mut self.recovery, payload)
            {
                trial = Some(size);
                max_payload = payload;
            }
        }
        if trial.is_none() && !may_send(&mut self.recovery, max_payload) {
            return Transmit::Nothing;
        }
        let nothing_in_flight = self.recovery.bytes_in_flight() == 0;
        let Some(range) = t.stream.next_chunk(max_payload as u64, nothing_in_flight) else {
            return Transmit::Nothing;
        };
        let len = (range.end - range.start) as usize;
        let app_limited = t.stream.is_window_limited(max_payload as u64);
        let ahead = t.stream.last_chunk_was_ahead();
        let order = if t.stream.last_chunk_was_new() {
            ReadOrder::Sequential
        } else {
            ReadOrder::Scattered
        };
        let transfer_id = t.id;
        let pn = self.next_packet_number;
        let mut failure = None;
        let payload = match t
            .blocks
            .slice(block_pool, t.content.as_ref(), range.start, len, order)
        {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                t.stream.unsend(range);
                t.waiting_for_content = true;
                return Transmit::WaitingForContent;
            }
            Err(e) => {
                events.push_back(ServerEvent::ReadFailed {
                    id: self.id,
                    path: t.path.clone(),
                    message: e.to_string(),
                });
                failure = Some(e.to_string());
                Bytes::new()
            }
        };
        let filled = payload.len();
        if filled < len {
            // The file shrank or failed under us: tell the client rather than
            // send bytes that are not the file's.
            let path = t.path.clone();
            self.transfer = None;
            self.control.push_back(Body::OpenError {
                transfer_id,
                kind: OpenErrorKind::NotReadable,
                message: format!(
                    "{path}: read failed at offset {}{}",
                    range.start + filled as u64,
                    failure.map_or_else(String::new, |f| format!(": {f}"))
                ),
            });
            return self.poll_transmit(
                now,
                default_payload,
                block_pool,
                out,
                payloads,
                starting,
                events,
            );
        }
        self.next_pn();
        encode_data_header(out, self.id, pn, transfer_id, range.start);
        let size = match (payloads, &self.keys) {
            (Some(payloads), None) => {
                payloads.push(SharedPayload {
                    at: out.len(),
                    bytes: payload,
                });
                out.len() - start + filled
            }
            (_, keys) => {
                out.extend_from_slice(&payload);
                if let Some(keys) = keys {
                    keys.seal_from(out, start);
                }
                out.len() - start
            }
        } as u64;
        self.bytes_sent += size;
        if let Some(size) = trial {
            self.large = LargeDatagrams::Trying(size);
        }
        self.recovery.on_packet_sent(
            now,
            pn,
            size,
            DataSent {
                transfer_id,
                range,
                ahead,
                app_limited,
                trial: trial.is_some(),
            },
        );
        Transmit::Sent(self.addr)
    }
}

/// Whether a packet in flight carries bytes the client still lacks.
fn still_needed(transfer: &Option<Transfer>, p: &SentPacket) -> bool {
    transfer
        .as_ref()
        .is_some_and(|t| p.transfer_id == t.id && (p.ahead || !t.stream.is_acked(p.range.clone())))
}

/// What a session's turn produced.
pub(super) enum Transmit {
    /// A datagram to this address was appended.
    Sent(SocketAddr),
    /// The session's Close to this address was appended: the session is
    /// over.
    Closed(SocketAddr, CloseReason),
    /// Nothing to send now.
    Nothing,
    /// Its next read would block: nothing until the content arrives.
    WaitingForContent,
}

/// Appends a Data packet's header (its payload follows, appended by the
/// caller), without the intermediate `Vec` that `Body::Data` would need.
fn encode_data_header(out: &mut Vec<u8>, id: ConnectionId, pn: u64, transfer_id: u32, offset: u64) {
    let start = out.len();
    Packet::new(
        id,
        pn,
        Body::Data {
            transfer_id,
            offset,
            payload: Vec::new(),
        },
    )
    .encode_append(out);
    debug_assert_eq!(out.len() - start, DATA_OVERHEAD);
}
