//! The data packets a session has in flight, by packet number.
//!
//! Packet numbers only grow, and ACKs name recent ones, so the packets sit
//! in a ring by number (slot `i` holds packet `base + i`) instead of a
//! search tree: on a loaded server the `BTreeMap` that held them (a node
//! walk for every send, every acknowledged packet and every loss check)
//! was 6–7 % of the CPU. A slot empties when its packet is acknowledged,
//! lost or dropped; emptied slots at the front are released at once, so
//! the ring spans the oldest packet still in flight to the newest.

use std::collections::VecDeque;

use super::sender::SentPacket;

/// Packets [`SentPackets::remove_range`] makes room for at once.
const ACK_RESERVE_PACKETS: usize = 64;

#[derive(Debug, Default)]
pub struct SentPackets {
    slots: VecDeque<Option<SentPacket>>,
    /// Packet number of `slots[0]`.
    base: u64,
    /// Slots that hold a packet.
    len: usize,
}

impl SentPackets {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Holds `packet`, replacing one of the same number.
    pub fn insert(&mut self, packet: SentPacket) {
        let pn = packet.packet_number;
        if self.len == 0 {
            self.slots.clear();
            self.base = pn;
        }
        // A session numbers its packets upwards; one below the ring (never
        // seen) still finds a slot, in front.
        while pn < self.base {
            self.slots.push_front(None);
            self.base -= 1;
        }
        let index = (pn - self.base) as usize;
        if index >= self.slots.len() {
            self.slots.resize_with(index + 1, || None);
        }
        if self.slots[index].replace(packet).is_none() {
            self.len += 1;
        }
    }

    fn index(&self, pn: u64) -> Option<usize> {
        let index = usize::try_from(pn.checked_sub(self.base)?).ok()?;
        (index < self.slots.len()).then_some(index)
    }

    pub fn remove(&mut self, pn: u64) -> Option<SentPacket> {
        let index = self.index(pn)?;
        let packet = self.slots[index].take()?;
        self.len -= 1;
        self.release_front();
        Some(packet)
    }

    /// Moves the packets numbered `smallest..=largest` into `out`, oldest
    /// first. The walk is clamped to the ring, and an ACK's ranges are
    /// disjoint (the decoder refuses others), so one ACK, however hostile,
    /// visits at most the slots of the packets in flight and the gaps
    /// between them.
    pub fn remove_range(&mut self, smallest: u64, largest: u64, out: &mut Vec<SentPacket>) {
        if smallest > largest || self.slots.is_empty() {
            return;
        }
        let last = self.base + self.slots.len() as u64 - 1;
        let (from, to) = (smallest.max(self.base), largest.min(last));
        if from > to {
            return;
        }
        // One allocation for the ACK's packets, not a doubling per few of
        // them (`Vec::push` growing from empty was 2 % of a loaded
        // server's CPU). At most what one ACK of a paced session covers:
        // behind an old hole the span reaches across slots emptied long
        // ago, and reserving all of it would be a large allocation per ACK.
        out.reserve(
            ((to - from + 1) as usize)
                .min(self.len)
                .min(ACK_RESERVE_PACKETS),
        );
        for index in (from - self.base) as usize..=(to - self.base) as usize {
            if let Some(p) = self.slots[index].take() {
                self.len -= 1;
                out.push(p);
            }
        }
        self.release_front();
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &SentPacket> {
        self.slots.iter().flatten()
    }

    /// The packets numbered below `pn`, oldest first.
    pub fn below(&self, pn: u64) -> impl Iterator<Item = &SentPacket> {
        let end = pn.saturating_sub(self.base).min(self.slots.len() as u64) as usize;
        self.slots.range(..end).flatten()
    }

    /// Gives back the slots' memory (the ring keeps its largest size
    /// otherwise: a window's worth of packets).
    pub fn shrink_to_fit(&mut self) {
        self.slots.shrink_to_fit();
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&SentPacket) -> bool) {
        for slot in self.slots.iter_mut() {
            if slot.as_ref().is_some_and(|p| !keep(p)) {
                *slot = None;
                self.len -= 1;
            }
        }
        self.release_front();
    }

    fn release_front(&mut self) {
        if self.len == 0 {
            self.base += self.slots.len() as u64;
            self.slots.clear();
            return;
        }
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Instant;

    use rand::{Rng, SeedableRng};

    fn packet(pn: u64, now: Instant) -> SentPacket {
        SentPacket {
            packet_number: pn,
            time_sent: now,
            size: 1000 + pn % 7,
            transfer_id: (pn % 3) as u32,
            range: pn * 1000..pn * 1000 + 1000,
            ahead: false,
            app_limited: false,
            trial: false,
            delivered: 0,
            delivered_time: now,
            first_sent_time: now,
        }
    }

    fn numbers<'a>(it: impl Iterator<Item = &'a SentPacket>) -> Vec<u64> {
        it.map(|p| p.packet_number).collect()
    }

    /// Random sends (with gaps in the numbers), ACK ranges, removals,
    /// loss scans and retains, against a `BTreeMap` doing the same.
    #[test]
    fn behaves_as_a_map_by_packet_number() {
        let now = Instant::now();
        for seed in 0..20 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut ring = SentPackets::default();
            let mut map: BTreeMap<u64, SentPacket> = BTreeMap::new();
            let mut next = rng.gen_range(0..5);
            for _ in 0..2000 {
                match rng.gen_range(0..10) {
                    0..=4 => {
                        ring.insert(packet(next, now));
                        map.insert(next, packet(next, now));
                        next += 1 + u64::from(rng.gen_bool(0.2)) * rng.gen_range(1..4);
                    }
                    5..=6 => {
                        let largest = rng.gen_range(0..next + 2);
                        let smallest = largest.saturating_sub(rng.gen_range(0..12));
                        let mut got = Vec::new();
                        ring.remove_range(smallest, largest, &mut got);
                        let want: Vec<u64> =
                            map.range(smallest..=largest).map(|(&pn, _)| pn).collect();
                        for pn in &want {
                            map.remove(pn);
                        }
                        assert_eq!(numbers(got.iter()), want, "seed {seed}");
                    }
                    7 => {
                        let pn = rng.gen_range(0..next + 2);
                        assert_eq!(
                            ring.remove(pn).map(|p| p.packet_number),
                            map.remove(&pn).map(|p| p.packet_number),
                            "seed {seed}"
                        );
                    }
                    8 => {
                        let pn = rng.gen_range(0..next + 2);
                        let want: Vec<u64> = map.range(..pn).map(|(&pn, _)| pn).collect();
                        assert_eq!(numbers(ring.below(pn)), want, "seed {seed}");
                    }
                    _ => {
                        let drop = rng.gen_range(0..3);
                        ring.retain(|p| p.transfer_id != drop);
                        map.retain(|_, p| p.transfer_id != drop);
                    }
                }
                assert_eq!(ring.len(), map.len(), "seed {seed}");
                assert_eq!(ring.is_empty(), map.is_empty(), "seed {seed}");
                assert_eq!(
                    numbers(ring.iter()),
                    map.keys().copied().collect::<Vec<_>>()
                );
                // The ring spans the oldest packet held to the newest.
                assert_eq!(
                    ring.slots.front().map(|s| s.is_some()),
                    (!map.is_empty()).then_some(true),
                    "seed {seed}"
                );
            }
        }
    }

    #[test]
    fn a_packet_below_the_ring_finds_a_slot_in_front() {
        let now = Instant::now();
        let mut ring = SentPackets::default();
        ring.insert(packet(10, now));
        ring.insert(packet(7, now));
        ring.insert(packet(10, now));
        assert_eq!(ring.len(), 2);
        assert_eq!(numbers(ring.iter()), vec![7, 10]);
        assert_eq!(numbers(ring.below(10)), vec![7]);
        assert_eq!(ring.remove(7).map(|p| p.packet_number), Some(7));
        assert_eq!(numbers(ring.iter()), vec![10]);
    }
}
