//! The peaks of the minute in progress, per history key (a page id, or
//! `storage::SITE` for the whole site): every figure the counter applies is
//! observed here with its time, so a peak that lasted a millisecond is
//! recorded. A minute closes when a figure of a later minute is observed or
//! when [`Peaks::roll`] passes its end; closed minutes wait in `closed` for
//! the snapshot to write them. A key whose figures are zero at the end of
//! its minute leaves the map (a page no one views costs nothing).

use std::collections::{HashMap, VecDeque};

use crate::{
    protocol::{PageId, Tally},
    storage::MinutePeak,
};

/// Length of a minute in ms.
const MINUTE_MS: u64 = 60_000;

/// One key's minute in progress.
#[derive(Debug, Clone, Copy)]
struct Open {
    /// The minute's index since the Unix epoch.
    minute: u64,
    /// The largest of each figure during it.
    peak: Tally,
    /// The figures now (the next minute starts at them).
    now: Tally,
}

/// Both figures, each the larger.
fn max(a: Tally, b: Tally) -> Tally {
    Tally {
        connections: a.connections.max(b.connections),
        visitors: a.visitors.max(b.visitors),
    }
}

#[derive(Debug, Default)]
pub(crate) struct Peaks {
    open: HashMap<PageId, Open>,
    /// Closed minutes not yet written, oldest first.
    pub(crate) closed: VecDeque<MinutePeak>,
}

impl Peaks {
    /// `key` shows `value` from `ms` on.
    pub(crate) fn observe(&mut self, key: &PageId, value: Tally, ms: u64) {
        let minute = ms / MINUTE_MS;
        match self.open.get_mut(key) {
            Some(o) => {
                if minute > o.minute {
                    self.closed
                        .push_back((key.clone(), o.minute * MINUTE_MS, o.peak));
                    o.minute = minute;
                    o.peak = o.now;
                }
                o.peak = max(o.peak, value);
                o.now = value;
            }
            None if value != Tally::ZERO => {
                let o = Open {
                    minute,
                    peak: value,
                    now: value,
                };
                self.open.insert(key.clone(), o);
            }
            None => {}
        }
    }

    /// Closes every minute that ended before `ms`; keys still showing
    /// someone open the next minute at their current figures.
    pub(crate) fn roll(&mut self, ms: u64) {
        let minute = ms / MINUTE_MS;
        let closed = &mut self.closed;
        self.open.retain(|key, o| {
            if o.minute >= minute {
                return true;
            }
            closed.push_back((key.clone(), o.minute * MINUTE_MS, o.peak));
            o.minute = minute;
            o.peak = o.now;
            o.now != Tally::ZERO
        });
    }

    /// The minute in progress of `key`: its start (ms) and peaks.
    pub(crate) fn current(&self, key: &str) -> Option<(u64, Tally)> {
        self.open.get(key).map(|o| (o.minute * MINUTE_MS, o.peak))
    }

    /// Every minute in progress, as it is now (the final snapshot writes
    /// them; the next process merges its own peaks of the minute into them).
    pub(crate) fn in_progress(&self) -> Vec<MinutePeak> {
        self.open
            .iter()
            .map(|(k, o)| (k.clone(), o.minute * MINUTE_MS, o.peak))
            .collect()
    }

    /// Keys with a minute in progress.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(visitors: u64, connections: u64) -> Tally {
        Tally {
            connections,
            visitors,
        }
    }

    /// A scripted sequence of viewers on a test clock gives exactly the
    /// expected per-minute peaks, including a peak that lasted 1 ms, a
    /// minute with no change (carried over at the figures it started
    /// with), and nothing once everyone left.
    #[test]
    fn a_scripted_sequence_gives_the_exact_minute_peaks() {
        let mut p = Peaks::default();
        let page = PageId::parse("a").unwrap();
        let m = |i: u64, s: u64| i * MINUTE_MS + s * 1000;
        let base = 29_000_000; // some minute index
        let at = |i: u64, s: u64| m(base + i, s);
        p.observe(&page, t(1, 1), at(0, 5));
        p.observe(&page, t(1, 2), at(0, 10)); // a second tab
        p.observe(&page, t(2, 3), at(0, 20));
        p.observe(&page, t(4, 5), at(0, 30));
        p.observe(&page, t(1, 1), at(0, 30) + 1); // 1 ms later
        p.observe(&page, t(2, 2), at(1, 0));
        p.observe(&page, t(1, 1), at(1, 59));
        p.roll(at(2, 0)); // minute 2: no change, one viewer throughout
        p.roll(at(3, 0));
        p.observe(&page, t(0, 0), at(3, 1));
        p.roll(at(4, 0));
        p.roll(at(9, 0));
        let got: Vec<(u64, Tally)> = p.closed.iter().map(|(_, s, v)| (*s, *v)).collect();
        assert_eq!(
            got,
            vec![
                (at(0, 0), t(4, 5)),
                (at(1, 0), t(2, 2)),
                (at(2, 0), t(1, 1)),
                (at(3, 0), t(1, 1)),
            ]
        );
        assert_eq!(p.len(), 0, "no one left: nothing open");
        assert_eq!(p.current("a"), None);
    }

    /// Keys are independent; the minute in progress is readable and listed
    /// for the final snapshot; a clock going back does not close a minute.
    #[test]
    fn keys_are_independent_and_in_progress_minutes_are_visible() {
        let mut p = Peaks::default();
        let (a, b) = (PageId::parse("a").unwrap(), PageId::parse("b").unwrap());
        p.observe(&a, t(3, 3), 120_000);
        p.observe(&b, t(1, 2), 130_000);
        p.observe(&a, t(1, 1), 100_000); // clock stepped back
        assert!(p.closed.is_empty());
        assert_eq!(p.current("a"), Some((120_000, t(3, 3))));
        let mut open = p.in_progress();
        open.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            open,
            vec![(a.clone(), 120_000, t(3, 3)), (b, 120_000, t(1, 2))]
        );
    }
}
