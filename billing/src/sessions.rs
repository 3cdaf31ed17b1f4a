//! Which batches of a sidecar session have been counted: exact duplicate
//! detection by `(session, seq)` with little state, and gaps.
//!
//! Per session the store keeps a watermark `next_seq` (every seq below it is
//! settled: counted or declared lost), the seqs counted above it (batches
//! that arrived out of order, as when a sidecar fails over between
//! collectors), when the oldest hole below those appeared, and the ranges
//! declared lost. A hole that stays open longer than the grace period is
//! declared lost — reported as missing usage — and the watermark moves past
//! it; if a lost batch turns up after all, it is counted and the range
//! shrinks.

use std::collections::BTreeSet;
use std::fmt::Write as _;

/// A session's dedupe state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    /// Every seq below this is counted or in `lost`.
    pub next_seq: u64,
    /// Seqs counted above `next_seq`.
    pub above: BTreeSet<u64>,
    /// When the current hole (seqs missing below the first of `above`)
    /// was first seen, microseconds since the Unix epoch.
    pub hole_since_micros: Option<i64>,
    /// Ranges (inclusive) declared lost and not recovered since.
    pub lost: Vec<(u64, u64)>,
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Count it.
    New,
    /// Counted before: drop it.
    Duplicate,
    /// Declared lost earlier, here after all: count it.
    Recovered,
}

/// A range of missing seqs, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing {
    pub from_seq: u64,
    pub to_seq: u64,
    /// Declared lost (true) or still waited for (false).
    pub lost: bool,
}

impl SessionState {
    /// Decides about batch `seq` arriving at `now_micros`, and records it.
    pub fn admit(&mut self, seq: u64, now_micros: i64) -> Verdict {
        if seq < self.next_seq {
            return match self.lost.iter().position(|&(from, to)| from <= seq && seq <= to) {
                Some(i) => {
                    let (from, to) = self.lost.remove(i);
                    if from < seq {
                        self.lost.push((from, seq - 1));
                    }
                    if seq < to {
                        self.lost.push((seq + 1, to));
                    }
                    self.lost.sort_unstable();
                    Verdict::Recovered
                }
                None => Verdict::Duplicate,
            };
        }
        if seq == self.next_seq {
            self.next_seq += 1;
            let mut closed = false;
            while self.above.remove(&self.next_seq) {
                self.next_seq += 1;
                closed = true;
            }
            if self.above.is_empty() {
                self.hole_since_micros = None;
            } else if closed {
                // The hole closed; the next one is only noticed now.
                self.hole_since_micros = Some(now_micros);
            }
            return Verdict::New;
        }
        if !self.above.insert(seq) {
            return Verdict::Duplicate;
        }
        self.hole_since_micros.get_or_insert(now_micros);
        Verdict::New
    }

    /// Declares lost every hole open since before `now - grace`, moving the
    /// watermark past it. Returns the number of seqs declared lost.
    pub fn declare_old_holes(&mut self, now_micros: i64, grace_micros: i64) -> u64 {
        let mut declared = 0;
        while let (Some(since), Some(&first)) = (self.hole_since_micros, self.above.first()) {
            if now_micros - since < grace_micros {
                break;
            }
            self.lost.push((self.next_seq, first - 1));
            declared += first - self.next_seq;
            self.next_seq = first;
            while self.above.remove(&self.next_seq) {
                self.next_seq += 1;
            }
            // A later hole, if any, is as old as the one just declared.
            self.hole_since_micros = if self.above.is_empty() { None } else { Some(since) };
        }
        declared
    }

    /// Every missing range: declared lost, and still open.
    pub fn missing(&self) -> Vec<Missing> {
        let mut missing: Vec<Missing> = self
            .lost
            .iter()
            .map(|&(from_seq, to_seq)| Missing {
                from_seq,
                to_seq,
                lost: true,
            })
            .collect();
        let mut expected = self.next_seq;
        for &seq in &self.above {
            if seq > expected {
                missing.push(Missing {
                    from_seq: expected,
                    to_seq: seq - 1,
                    lost: false,
                });
            }
            expected = seq + 1;
        }
        missing
    }

    /// `above` as stored: seqs separated by spaces.
    pub fn above_text(&self) -> String {
        let mut text = String::new();
        for seq in &self.above {
            let _ = write!(text, "{}{seq}", if text.is_empty() { "" } else { " " });
        }
        text
    }

    /// `lost` as stored: `from-to` ranges separated by spaces.
    pub fn lost_text(&self) -> String {
        self.lost
            .iter()
            .map(|(f, t)| format!("{f}-{t}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Reads the stored form back; `None` if it is malformed.
    pub fn from_stored(next_seq: i64, above: &str, hole_since_micros: Option<i64>, lost: &str) -> Option<SessionState> {
        let above = above
            .split_whitespace()
            .map(|s| s.parse().ok())
            .collect::<Option<BTreeSet<u64>>>()?;
        let lost = lost
            .split_whitespace()
            .map(|r| {
                let (f, t) = r.split_once('-')?;
                Some((f.parse().ok()?, t.parse().ok()?))
            })
            .collect::<Option<Vec<(u64, u64)>>>()?;
        Some(SessionState {
            next_seq: u64::try_from(next_seq).ok()?,
            above,
            hole_since_micros,
            lost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: i64 = 1_000;

    fn admit_all(state: &mut SessionState, seqs: &[u64]) -> Vec<Verdict> {
        seqs.iter().map(|&s| state.admit(s, 0)).collect()
    }

    #[test]
    fn in_order_batches_advance_the_watermark_and_replays_are_duplicates() {
        let mut s = SessionState::default();
        assert!(admit_all(&mut s, &[0, 1, 2]).iter().all(|v| *v == Verdict::New));
        assert_eq!(s.next_seq, 3);
        assert_eq!(admit_all(&mut s, &[0, 2]), [Verdict::Duplicate, Verdict::Duplicate]);
        assert!(s.missing().is_empty());
    }

    #[test]
    fn out_of_order_and_duplicated_batches_count_once() {
        let mut s = SessionState::default();
        // A failover: the new collector delivers 3, 4 before the old one's 1, 2.
        let verdicts = admit_all(&mut s, &[0, 3, 4, 3, 1, 4, 2, 1]);
        use Verdict::*;
        assert_eq!(verdicts, [New, New, New, Duplicate, New, Duplicate, New, Duplicate]);
        assert_eq!((s.next_seq, s.above.len(), s.hole_since_micros), (5, 0, None));
    }

    #[test]
    fn open_holes_are_reported_then_declared_lost_after_the_grace() {
        let mut s = SessionState::default();
        s.admit(0, 0);
        s.admit(3, 100);
        s.admit(4, 200);
        s.admit(7, 300);
        assert_eq!(
            s.missing(),
            [
                Missing {
                    from_seq: 1,
                    to_seq: 2,
                    lost: false
                },
                Missing {
                    from_seq: 5,
                    to_seq: 6,
                    lost: false
                }
            ]
        );
        assert_eq!(s.declare_old_holes(100 + GRACE - 1, GRACE), 0, "not yet");
        assert_eq!(
            s.declare_old_holes(100 + GRACE, GRACE),
            4,
            "both holes, as old as the first"
        );
        assert_eq!((s.next_seq, s.above.len()), (8, 0));
        assert_eq!(s.lost, [(1, 2), (5, 6)]);
        assert!(s.missing().iter().all(|m| m.lost));
    }

    #[test]
    fn a_lost_batch_that_turns_up_is_recovered_once() {
        let mut s = SessionState::default();
        s.admit(0, 0);
        s.admit(4, 0);
        s.declare_old_holes(GRACE, GRACE);
        assert_eq!(s.lost, [(1, 3)]);
        assert_eq!(s.admit(2, 0), Verdict::Recovered);
        assert_eq!(s.lost, [(1, 1), (3, 3)]);
        assert_eq!(s.admit(2, 0), Verdict::Duplicate);
        assert_eq!(s.admit(1, 0), Verdict::Recovered);
        assert_eq!(s.admit(3, 0), Verdict::Recovered);
        assert!(s.lost.is_empty());
    }

    #[test]
    fn closing_a_hole_restarts_the_clock_for_the_next() {
        let mut s = SessionState::default();
        s.admit(1, 0); // hole {0} since 0
        s.admit(3, 10); // hole {2}
        s.admit(0, 500); // closes {0}; {2} is counted from now
        assert_eq!(s.hole_since_micros, Some(500));
        assert_eq!(s.declare_old_holes(GRACE, GRACE), 0);
        assert_eq!(s.declare_old_holes(500 + GRACE, GRACE), 1);
    }

    #[test]
    fn a_hole_that_shrinks_keeps_its_age() {
        let mut s = SessionState::default();
        s.admit(3, 0); // hole {0, 1, 2} since 0
        s.admit(0, 900); // hole {1, 2}: the same hole
        assert_eq!(s.hole_since_micros, Some(0));
        assert_eq!(s.declare_old_holes(GRACE, GRACE), 2);
    }

    #[test]
    fn stored_form_round_trips() {
        let mut s = SessionState::default();
        for seq in [0, 2, 5, 9] {
            s.admit(seq, 7);
        }
        s.lost.push((100, 120));
        let back = SessionState::from_stored(s.next_seq as i64, &s.above_text(), s.hole_since_micros, &s.lost_text());
        assert_eq!(back, Some(s));
        assert_eq!(SessionState::from_stored(0, "1 x", None, ""), None);
        assert_eq!(SessionState::from_stored(0, "", None, "1-"), None);
    }
}
