//! Which LSN may be confirmed to PostgreSQL, given out-of-order Kafka acks.
//!
//! Every published record gets a sequence number when it is handed to the
//! producer. Each commit adds a checkpoint "(records issued so far, end LSN)".
//! A checkpoint's LSN may be confirmed once every record issued before it has
//! been acknowledged — acknowledgements arrive out of order across
//! partitions, and many records share one LSN, so neither the highest acked
//! record nor the LSN of the latest ack is safe to confirm.
//!
//! The confirmed LSN only moves forward. Pure: no IO, no clock.

use std::collections::VecDeque;

use crate::event::Lsn;

#[derive(Debug)]
pub struct AckTracker {
    /// Sequence number of `window[0]`; every record below it is acked.
    base: u64,
    /// Ack flags for records `base..next_seq`.
    window: VecDeque<bool>,
    next_seq: u64,
    /// (records issued before this commit, commit end LSN), oldest first.
    checkpoints: VecDeque<(u64, Lsn)>,
    confirmed: Lsn,
    unacked: usize,
}

impl AckTracker {
    pub fn new(start: Lsn) -> Self {
        AckTracker {
            base: 0,
            window: VecDeque::new(),
            next_seq: 0,
            checkpoints: VecDeque::new(),
            confirmed: start,
            unacked: 0,
        }
    }

    /// Registers a record handed to the producer; returns its sequence number.
    pub fn issue(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.window.push_back(false);
        self.unacked += 1;
        seq
    }

    /// Marks a record as durably acknowledged by Kafka.
    pub fn ack(&mut self, seq: u64) {
        debug_assert!(seq < self.next_seq, "ack for a record never issued");
        if seq < self.base || seq >= self.next_seq {
            return;
        }
        let slot = &mut self.window[(seq - self.base) as usize];
        if *slot {
            return;
        }
        *slot = true;
        self.unacked -= 1;
        while self.window.front() == Some(&true) {
            self.window.pop_front();
            self.base += 1;
        }
        self.release();
    }

    /// Every record issued so far belongs to a transaction ending at `lsn`.
    pub fn commit(&mut self, lsn: Lsn) {
        if let Some(&(issued, last)) = self.checkpoints.back() {
            if issued == self.next_seq {
                // nothing new since the last checkpoint: just move it
                let back = self.checkpoints.back_mut().expect("checked above");
                back.1 = last.max(lsn);
                self.release();
                return;
            }
        }
        self.checkpoints.push_back((self.next_seq, lsn));
        self.release();
    }

    /// Nothing is pending and the stream has delivered everything up to
    /// `lsn` (a keepalive's WAL end while no transaction is open): confirm it
    /// so an idle or fully filtered source does not pin WAL.
    pub fn advance_idle(&mut self, lsn: Lsn) {
        if self.is_idle() {
            self.confirmed = self.confirmed.max(lsn);
        }
    }

    fn release(&mut self) {
        while let Some(&(issued, lsn)) = self.checkpoints.front() {
            if issued > self.base {
                break;
            }
            self.confirmed = self.confirmed.max(lsn);
            self.checkpoints.pop_front();
        }
    }

    /// The highest LSN whose records are all in Kafka.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Records handed to the producer and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.unacked
    }

    pub fn is_idle(&self) -> bool {
        self.window.is_empty() && self.checkpoints.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_of_order_acks_hold_back_the_lsn() {
        let mut t = AckTracker::new(Lsn(100));
        let a = t.issue();
        let b = t.issue();
        t.commit(Lsn(200));
        let c = t.issue();
        t.commit(Lsn(300));
        t.ack(c);
        assert_eq!(t.confirmed(), Lsn(100));
        t.ack(b);
        assert_eq!(t.confirmed(), Lsn(100));
        t.ack(a);
        assert_eq!(t.confirmed(), Lsn(300));
        assert!(t.is_idle());
    }

    #[test]
    fn records_sharing_an_lsn_all_count() {
        let mut t = AckTracker::new(Lsn(0));
        let seqs: Vec<_> = (0..5).map(|_| t.issue()).collect();
        t.commit(Lsn(50));
        for s in &seqs[1..] {
            t.ack(*s);
        }
        assert_eq!(t.confirmed(), Lsn(0));
        t.ack(seqs[0]);
        assert_eq!(t.confirmed(), Lsn(50));
    }

    #[test]
    fn empty_transactions_confirm_at_once_but_not_past_pending_records() {
        let mut t = AckTracker::new(Lsn(0));
        t.commit(Lsn(10));
        assert_eq!(t.confirmed(), Lsn(10));
        let a = t.issue();
        t.commit(Lsn(20));
        t.commit(Lsn(30)); // filtered transaction after a pending one
        assert_eq!(t.confirmed(), Lsn(10));
        t.advance_idle(Lsn(40)); // not idle: ignored
        assert_eq!(t.confirmed(), Lsn(10));
        t.ack(a);
        assert_eq!(t.confirmed(), Lsn(30));
        t.advance_idle(Lsn(40));
        assert_eq!(t.confirmed(), Lsn(40));
    }

    #[test]
    fn open_transaction_records_block_idle_advance() {
        let mut t = AckTracker::new(Lsn(0));
        let a = t.issue(); // transaction not yet committed
        t.ack(a);
        // acked, but its commit has not been seen: window empty, no checkpoint
        assert!(t.is_idle());
        // callers must not call advance_idle while a transaction is open;
        // the capture loop guards that. Confirmed stays where it was.
        assert_eq!(t.confirmed(), Lsn(0));
    }

    proptest! {
        /// Whatever the ack order, the confirmed LSN never passes a commit
        /// whose records are not all acked, and ends at the last commit.
        #[test]
        fn never_confirms_unacked(
            tx_sizes in proptest::collection::vec(0usize..6, 1..20),
            order_seed in any::<u64>(),
        ) {
            let mut t = AckTracker::new(Lsn(0));
            let mut owner = Vec::new(); // seq -> commit lsn
            for (i, n) in tx_sizes.iter().enumerate() {
                let lsn = Lsn((i as u64 + 1) * 10);
                for _ in 0..*n {
                    t.issue();
                    owner.push(lsn);
                }
                t.commit(lsn);
            }
            let mut order: Vec<u64> = (0..owner.len() as u64).collect();
            let mut x = order_seed | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut acked = vec![false; owner.len()];
            for seq in order {
                t.ack(seq);
                acked[seq as usize] = true;
                let first_unacked = acked.iter().position(|a| !a);
                if let Some(i) = first_unacked {
                    prop_assert!(t.confirmed() < owner[i]);
                }
            }
            prop_assert_eq!(t.confirmed(), Lsn(tx_sizes.len() as u64 * 10));
            prop_assert!(t.is_idle());
        }
    }
}
