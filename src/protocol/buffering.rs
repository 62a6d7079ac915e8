//! When the player should wait for the network, and for how much.
//!
//! Applications that follow GStreamer's buffering documentation (gst-launch,
//! gst-play, playbin apps) pause the pipeline while a source reports less
//! than 100 % and resume at 100 %. So 100 % must always be reachable: the
//! bytes the percentage waits for have to fit in the window the server was
//! last told, or the server stops at the window, the pipeline never consumes,
//! the window never moves, and the stream freezes with no error.
//!
//! Both quantities therefore come from one number, the read-ahead the
//! connection holds for its transfer ([`StreamReceiver::read_ahead`]):
//!
//! ```text
//! window = read offset + read-ahead                 (told to the server)
//! goal   = min(max(min(read-ahead / 2, start cap), slow-link goal),
//!              rest of file, window last told − read offset)
//! ```
//!
//! The slow-link goal (what it takes to wait once and play to the end on a
//! link slower than the media, see `read_ahead.rs`) is part of the
//! read-ahead too, so the window covers it.
//!
//! The last term makes the invariant hold by construction; the connection
//! also sends a grown window at once while buffering, so that term does not
//! shrink the goal for longer than one datagram's trip.
//!
//! [`StreamReceiver::read_ahead`]: super::receiver::StreamReceiver::read_ahead

use std::fmt;
use std::time::{Duration, Instant};

/// Buffering ends (100 %) once this share of the read-ahead is ready, or
/// the rest of the file: waiting for the whole read-ahead would delay the
/// start for no gain.
pub const BUFFERING_GOAL_DIVISOR: u64 = 2;
/// At start and after a jump the server must serve, buffering ends once
/// this much is ready (or the share above, if smaller): the link has shown
/// nothing bad yet, and on a 20 Mbit/s, 80 ms path half the initial
/// read-ahead took five more round trips of slow start to arrive.
pub const START_BUFFERING_BYTES: u64 = 256 * 1024;

/// An underrun (the streaming thread finds nothing ready) is reported as
/// buffering only while the pipeline holds less than this much media ahead
/// of playback: with more, playback goes on from the pipeline's own queues
/// while the source waits, and pausing it would be a stutter for nothing.
pub const UNDERRUN_HOLD: Duration = Duration::from_secs(1);
/// A link at least this many times the media's rate is fast enough for the
/// player to start on what it already holds (see
/// `ClientConnection::buffering_level`).
pub const FAST_LINK_FACTOR: f64 = 4.0;

/// Why the player waits for the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferingCause {
    /// The first bytes, or a jump the server must serve.
    Start,
    /// Playback caught up with the data.
    Underrun,
}

/// How far buffering got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferingLevel {
    pub cause: BufferingCause,
    /// 0..=100; 100 ends buffering.
    pub percent: u8,
    /// Bytes ready at the read offset.
    pub available: u64,
    /// Bytes that make 100 %.
    pub goal: u64,
    /// `available` at which the level reaches 100 % (less than `goal` when
    /// what the player holds counts): a waiter needs to look again only
    /// then, not on every datagram.
    pub full_at: u64,
}

/// The bytes that make 100 %, from the read-ahead, the bytes left in the
/// file and the window the server was last told (all relative to the read
/// offset).
pub fn buffering_goal(
    cause: BufferingCause,
    read_ahead: u64,
    slow_link_goal: u64,
    remaining: u64,
    advertised_ahead: u64,
) -> u64 {
    let mut goal = read_ahead / BUFFERING_GOAL_DIVISOR;
    if cause == BufferingCause::Start {
        goal = goal.min(START_BUFFERING_BYTES);
    }
    // On a link slower than the media the read-ahead is the whole window
    // (see `ReadAheadPolicy::read_ahead`) and says nothing about the wait:
    // the download-time estimate is the goal.
    if slow_link_goal > 0 {
        goal = slow_link_goal;
    }
    goal.min(remaining).min(advertised_ahead)
}

/// Percent of `goal` that `available` covers; 100 for an empty goal.
pub fn buffering_percent(available: u64, goal: u64) -> u8 {
    if goal == 0 {
        return 100;
    }
    (available.min(goal) * 100 / goal) as u8
}

/// The flow-control state, for an error that says why a stream stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowState {
    /// Next offset the player gets.
    pub read_offset: u64,
    /// Bytes past the read offset the server was last allowed to send.
    pub window: u64,
    /// Bytes held, in order or not.
    pub buffered: u64,
    /// Bytes ready at the read offset.
    pub available: u64,
    /// Bytes the window allows that have not arrived (sent and lost, in
    /// flight, or not sent yet).
    pub outstanding: u64,
    /// Since the last new byte of the file arrived (None: none yet).
    pub since_last_data: Option<Duration>,
    /// Buffering and how far it got, if the player waits.
    pub buffering: Option<BufferingLevel>,
}

impl FlowState {
    /// The state as of `now`, given when the last new byte came.
    pub fn since(mut self, last_data: Option<Instant>, now: Instant) -> Self {
        self.since_last_data = last_data.map(|t| now.saturating_duration_since(t));
        self
    }
}

impl fmt::Display for FlowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at byte {}: window {} bytes ahead, {} buffered ({} ready), {} allowed but not received",
            self.read_offset, self.window, self.buffered, self.available, self.outstanding
        )?;
        match self.since_last_data {
            Some(d) => write!(f, ", last data {:.1} s ago", d.as_secs_f64())?,
            None => write!(f, ", no data yet")?,
        }
        if let Some(b) = self.buffering {
            write!(f, ", buffering {} % of {} bytes", b.percent, b.goal)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_goal_never_exceeds_the_window_told() {
        // The freeze of issue 9: a 4.4 MB read-ahead wanted 2.2 MB while the
        // server had been told 1 MiB.
        let goal = buffering_goal(BufferingCause::Underrun, 4_400_000, 0, 30_000_000, 1 << 20);
        assert_eq!(goal, 1 << 20);
        assert_eq!(buffering_percent(1 << 20, goal), 100);
        // Start caps the goal; the end of the file caps it too.
        assert_eq!(
            buffering_goal(BufferingCause::Start, 4_000_000, 0, 30_000_000, 4_000_000),
            START_BUFFERING_BYTES
        );
        assert_eq!(
            buffering_goal(BufferingCause::Underrun, 4_000_000, 0, 1000, 4_000_000),
            1000
        );
        // On a slow link the goal is what it takes to wait once, within
        // the window told.
        assert_eq!(
            buffering_goal(
                BufferingCause::Underrun,
                8_000_000,
                6_000_000,
                30_000_000,
                8_000_000
            ),
            6_000_000
        );
        assert_eq!(
            buffering_goal(
                BufferingCause::Start,
                8_000_000,
                6_000_000,
                30_000_000,
                5_000_000
            ),
            5_000_000
        );
        // ... however wide the window is.
        assert_eq!(
            buffering_goal(
                BufferingCause::Underrun,
                16 << 20,
                1_000_000,
                30_000_000,
                16 << 20
            ),
            1_000_000
        );
        assert_eq!(buffering_percent(0, 0), 100);
        assert_eq!(buffering_percent(50, 200), 25);
    }
}
