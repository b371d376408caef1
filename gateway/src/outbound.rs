//! A connection's outbound queue: frames for the client, bounded (a client that stops reading fills
//! it, and whoever pushes then sees [`Refused::Full`] and asks for a close instead of waiting), and a
//! few control frames (pongs, closes) that go ahead of them. The write task ([`crate::framing`])
//! takes what is queued in one go.
//!
//! Ours rather than two tokio channels, for memory: each channel allocated a block of 32 slots and
//! its shared state when the connection opened, about a third of what an idle connection cost.
//! This queue holds no allocation while it is empty.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::framing::Control;

/// Control frames that may wait; more are dropped (only the latest ping needs a pong).
const CONTROLS: usize = 16;

/// Room kept in an emptied queue; a queue that grew past it is released.
const KEEP_FRAMES: usize = 8;

/// Why a frame was not queued.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// The client does not read fast enough.
    Full,
    /// The write task ended: nothing more will be sent.
    Closed,
}

/// What the write task is to do next.
#[derive(Debug)]
pub enum Next {
    /// Send this control frame. A close comes with the frames queued before it in the batch: they
    /// are answers the client is owed and go out first.
    Control(Control),
    /// Send the frames put in the batch.
    Frames,
    /// The connection ended and everything queued was taken.
    End,
}

/// The queue, shared by the connection's task, whoever pushes to the connection, and its write task.
pub struct Outbound {
    queued: Mutex<Queued>,
    wake: Notify,
    capacity: usize,
}

#[derive(Default)]
struct Queued {
    frames: VecDeque<Bytes>,
    controls: VecDeque<Control>,
    /// No more frames come: the write task sends what is queued, then ends.
    finished: bool,
    /// The write task ended.
    closed: bool,
}

impl Outbound {
    /// A queue for at most `capacity` frames.
    pub fn new(capacity: usize) -> Self {
        Outbound { queued: Mutex::default(), wake: Notify::new(), capacity: capacity.max(1) }
    }

    /// Queues a frame for the client.
    pub fn push(&self, frame: Bytes) -> Result<(), Refused> {
        let mut q = self.lock();
        if q.closed {
            return Err(Refused::Closed);
        }
        if q.frames.len() >= self.capacity {
            return Err(Refused::Full);
        }
        q.frames.push_back(frame);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    /// Queues a control frame ahead of the frames; false if it was dropped.
    pub fn control(&self, control: Control) -> bool {
        let mut q = self.lock();
        if q.closed || q.controls.len() >= CONTROLS {
            return false;
        }
        q.controls.push_back(control);
        drop(q);
        self.wake.notify_one();
        true
    }

    /// Frames that fit now.
    pub fn room(&self) -> usize {
        self.capacity - self.lock().frames.len().min(self.capacity)
    }

    /// Most frames the queue holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the write task ended.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The connection ended: the write task sends what is queued, then ends.
    pub fn finish(&self) {
        self.lock().finished = true;
        self.wake.notify_one();
    }

    /// For the write task: waits for something to send. Frames go into `batch` (at most
    /// `max_frames`, and no more once `max_bytes` are reached).
    pub async fn next(&self, batch: &mut Vec<Bytes>, max_frames: usize, max_bytes: usize) -> Next {
        loop {
            {
                let mut q = self.lock();
                if let Some(control) = q.controls.pop_front() {
                    if matches!(control, Control::Close(..)) {
                        batch.extend(q.frames.drain(..));
                    }
                    return Next::Control(control);
                }
                if !q.frames.is_empty() {
                    let mut bytes = 0;
                    while batch.len() < max_frames && bytes < max_bytes {
                        let Some(frame) = q.frames.pop_front() else { break };
                        bytes += frame.len();
                        batch.push(frame);
                    }
                    if q.frames.is_empty() && q.frames.capacity() > KEEP_FRAMES {
                        q.frames = VecDeque::new();
                    }
                    return Next::Frames;
                }
                if q.finished {
                    return Next::End;
                }
            }
            // One waiter only (the write task): a wake-up between the check and here is kept.
            self.wake.notified().await;
        }
    }

    /// For the write task, when it ends: whoever pushes now learns the connection is gone.
    pub fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.frames = VecDeque::new();
        q.controls.clear();
    }

    fn lock(&self) -> MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The frames queued now, taken (tests).
    #[cfg(test)]
    pub fn take_all(&self) -> Vec<Bytes> {
        self.lock().frames.drain(..).collect()
    }

    /// The first control frame queued, taken (tests).
    #[cfg(test)]
    pub fn take_control(&self) -> Option<Control> {
        self.lock().controls.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::OpCode;

    fn frame(n: usize) -> Bytes {
        Bytes::from(format!("frame {n}"))
    }

    #[tokio::test]
    async fn controls_go_first_and_frames_leave_in_batches_in_order() {
        let out = Outbound::new(100);
        for n in 0..10 {
            out.push(frame(n)).unwrap();
        }
        assert!(out.control(Control::Obligated(OpCode::Pong, vec![])));
        let mut batch = Vec::new();
        assert!(matches!(out.next(&mut batch, 4, 1 << 20).await, Next::Control(Control::Obligated(OpCode::Pong, _))));
        assert!(batch.is_empty());
        assert!(matches!(out.next(&mut batch, 4, 1 << 20).await, Next::Frames));
        assert_eq!(batch, (0..4).map(frame).collect::<Vec<_>>(), "at most max_frames");
        batch.clear();
        assert!(matches!(out.next(&mut batch, 100, 7).await, Next::Frames)); // "frame 4" is 7 bytes
        assert_eq!(batch, vec![frame(4)], "stops once max_bytes are reached");
        batch.clear();
        assert!(matches!(out.next(&mut batch, 100, 1 << 20).await, Next::Frames));
        assert_eq!(batch, (5..10).map(frame).collect::<Vec<_>>());
        assert_eq!(out.lock().frames.capacity(), 0, "an emptied queue that grew holds nothing");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_a_close_takes_what_was_queued_before_it() {
        let out = Outbound::new(3);
        for n in 0..3 {
            out.push(frame(n)).unwrap();
        }
        assert_eq!(out.push(frame(3)), Err(Refused::Full));
        assert_eq!(out.room(), 0);
        assert!(out.control(Control::Close(4001, "slow_consumer")));
        let mut batch = Vec::new();
        assert!(matches!(out.next(&mut batch, 1, 1).await, Next::Control(Control::Close(4001, _))));
        assert_eq!(batch, (0..3).map(frame).collect::<Vec<_>>(), "owed answers go before the close");
        out.close();
        assert_eq!(out.push(frame(4)), Err(Refused::Closed));
        assert!(out.is_closed());
    }

    #[tokio::test]
    async fn the_writer_wakes_for_a_push_and_ends_after_the_last_frame_once_finished() {
        let out = std::sync::Arc::new(Outbound::new(10));
        let writer = {
            let out = out.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let mut batch = Vec::new();
                    match out.next(&mut batch, 10, 1 << 20).await {
                        Next::Frames => seen.extend(batch),
                        Next::End => return seen,
                        Next::Control(c) => panic!("{c:?}"),
                    }
                }
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        out.push(frame(1)).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        out.push(frame(2)).unwrap();
        out.finish();
        let seen = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await.unwrap().unwrap();
        assert_eq!(seen, vec![frame(1), frame(2)]);
    }
}
