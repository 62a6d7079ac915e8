//! A set of disjoint half-open `u64` ranges.
//!
//! Used for the byte ranges a sender knows are acknowledged or must be
//! resent, and for the packet numbers a receiver has seen.

use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end, disjoint and never adjacent (adjacent ranges are merged).
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of disjoint ranges.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Adds `r`, merging with neighbours.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        // The common case, in-order arrival: `r` extends the last range,
        // or starts after it. Nothing follows the last range to merge
        // with, so no search is needed (two per datagram were most of the
        // receiving thread's tree walks on a fast pull).
        if let Some(mut last) = self.map.last_entry() {
            if *last.key() <= r.start {
                let end = last.get_mut();
                if *end >= r.start {
                    *end = (*end).max(r.end);
                } else {
                    self.map.insert(r.start, r.end);
                }
                return;
            }
        }
        // Otherwise `r` may extend the range before it and reach no other:
        // that range grows in place (removing and re-inserting it was a
        // tree update per datagram).
        let next_start = self.map.range(r.start + 1..).next().map(|(&s, _)| s);
        if let Some((_, e)) = self.map.range_mut(..=r.start).next_back() {
            if *e >= r.start && next_start.is_none_or(|n| n > r.end) {
                *e = (*e).max(r.end);
                return;
            }
        }
        let mut start = r.start;
        let mut end = r.end;
        // A range starting at or before `start` may overlap or touch.
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.map.remove(&s);
            }
        }
        // Swallow every range that starts inside [start, end].
        let swallowed: Vec<(u64, u64)> =
            self.map.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in swallowed {
            end = end.max(e);
            self.map.remove(&s);
        }
        self.map.insert(start, end);
    }

    /// Removes `r` from the set, the last overlapping range first, without
    /// collecting them (a server's every ACK and a client's every read
    /// remove a range, and the list of them was an allocation each).
    pub fn remove(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        while let Some((&s, &e)) = self.map.range(..r.end).next_back() {
            if e <= r.start {
                break;
            }
            self.map.remove(&s);
            if e > r.end {
                self.map.insert(r.end, e);
            }
            if s < r.start {
                // Every range before this one ends before it starts.
                self.map.insert(s, r.start);
                break;
            }
        }
    }

    /// True if every value of `r` is in the set.
    pub fn contains_range(&self, r: Range<u64>) -> bool {
        if r.start >= r.end {
            return true;
        }
        match self.map.range(..=r.start).next_back() {
            Some((_, &e)) => e >= r.end,
            None => false,
        }
    }

    pub fn contains(&self, v: u64) -> bool {
        self.contains_range(v..v.saturating_add(1))
    }

    /// True if any value of `r` is in the set.
    pub fn intersects(&self, r: Range<u64>) -> bool {
        if r.start >= r.end {
            return false;
        }
        self.map
            .range(..r.end)
            .next_back()
            .is_some_and(|(_, &e)| e > r.start)
    }

    /// Start of the first range beginning after `pos`: where the gap at
    /// `pos` ends. A lookup, not a scan: both the sender (what to resend)
    /// and the receiver (what to store) walk gaps with it on every packet.
    pub fn next_start_after(&self, pos: u64) -> Option<u64> {
        self.map
            .range(pos.saturating_add(1)..)
            .next()
            .map(|(&s, _)| s)
    }

    // `first_key_value` walks one edge of the tree; `iter()` sets up both.
    pub fn first(&self) -> Option<Range<u64>> {
        self.map.first_key_value().map(|(&s, &e)| s..e)
    }

    pub fn last(&self) -> Option<Range<u64>> {
        self.map.last_key_value().map(|(&s, &e)| s..e)
    }

    pub fn pop_first(&mut self) -> Option<Range<u64>> {
        self.map.pop_first().map(|(s, e)| s..e)
    }

    pub fn pop_last(&mut self) -> Option<Range<u64>> {
        self.map.pop_last().map(|(s, e)| s..e)
    }

    /// Ranges from highest to lowest.
    pub fn iter_descending(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().rev().map(|(&s, &e)| s..e)
    }

    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
    }

    /// End of the range that contains `from`, or `from` itself: the first
    /// missing value at or after `from`.
    pub fn contiguous_end(&self, from: u64) -> u64 {
        match self.map.range(..=from).next_back() {
            Some((_, &e)) if e > from => e,
            _ => from,
        }
    }

    /// Total number of values covered.
    pub fn covered(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn merges_touching_and_overlapping() {
        let mut s = RangeSet::new();
        s.insert(0..10);
        s.insert(20..30);
        s.insert(10..20);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..30]);
        s.insert(25..40);
        assert_eq!(s.first(), Some(0..40));
        s.remove(5..8);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..5, 8..40]);
        assert!(s.contains_range(8..40));
        assert!(!s.contains_range(4..9));
        assert!(s.intersects(4..9));
        assert!(!s.intersects(5..8));
        assert_eq!(s.contiguous_end(0), 5);
        assert_eq!(s.contiguous_end(5), 5);
        assert_eq!(s.covered(), 37);
        assert_eq!(s.next_start_after(0), Some(8));
        assert_eq!(s.next_start_after(8), None);
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 0u64..30), 0..60)) {
            let mut s = RangeSet::new();
            let mut model = BTreeSet::new();
            for (add, start, len) in ops {
                let r = start..start + len;
                if add {
                    s.insert(r.clone());
                    model.extend(r);
                } else {
                    s.remove(r.clone());
                    for v in r { model.remove(&v); }
                }
            }
            for v in 0..240u64 {
                prop_assert_eq!(s.contains(v), model.contains(&v));
            }
            prop_assert_eq!(s.covered(), model.len() as u64);
            // Never adjacent, never empty.
            let v: Vec<_> = s.iter().collect();
            for w in v.windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            for r in v { prop_assert!(r.start < r.end); }
        }
    }
}
