//! What the relay's data plane hands up to the control plane (Python): the
//! rare control requests, session ends and log lines, in one bounded queue.
//!
//! The queue is drained by the Python event loop, woken through one end of a
//! socket pair it watches: a byte is written when the queue goes from empty
//! to not empty, so a burst of events costs one wake-up. Nothing per byte or
//! per public connection goes through here.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

/// Control requests queued before the sessions' readers wait for Python to
/// catch up (a flood of BINDs stalls its own link, not the relay's memory).
pub const MAX_QUEUED_REQUESTS: usize = 4096;

/// Log lines queued before further ones are counted and dropped: a flood of
/// refusals must not grow the queue while Python is busy.
pub const MAX_QUEUED_LOGS: usize = 1024;

/// Python's logging levels.
pub const DEBUG: u8 = 10;
pub const INFO: u8 = 20;
pub const WARNING: u8 = 30;
pub const ERROR: u8 = 40;

/// One thing for the control plane.
#[derive(Debug)]
pub enum Event {
    /// An agent's HELLO payload (JSON, decoded in Python), once its TLS is done.
    Hello {
        session: String,
        peer: String,
        payload: Vec<u8>,
    },
    /// A BIND or UNBIND payload (JSON, decoded in Python).
    Request {
        session: String,
        kind: u8,
        payload: Vec<u8>,
    },
    /// The session is gone; its streams were reset.
    SessionClosed { session: String },
    /// (the agent's engine) a link to a relay is up: TLS done, the ALPN protocol agreed
    Connected {
        session: String,
        alpn: Option<Vec<u8>>,
    },
    /// (the agent's engine) a link to a relay could not be made: what failed, in one line
    Failed {
        session: String,
        kind: &'static str,
        message: String,
    },
    /// A log line; `kind` names a rate-limited family of refusals, or is empty.
    Log {
        kind: &'static str,
        level: u8,
        message: String,
    },
}

/// The queue and its wake-up socket.
pub struct Events {
    queue: Mutex<Queue>,
    room: Notify,
    wake: UnixStream,
    dropped_logs: AtomicU64,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Event>,
    requests: usize,
    logs: usize,
}

impl Events {
    /// The queue, and the socket end Python watches.
    pub fn new() -> std::io::Result<(Self, UnixStream)> {
        let (wake, watched) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        watched.set_nonblocking(true)?;
        let events = Self {
            queue: Mutex::new(Queue::default()),
            room: Notify::new(),
            wake,
            dropped_logs: AtomicU64::new(0),
        };
        Ok((events, watched))
    }

    fn push(&self, event: Event) {
        let was_empty = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            match event {
                Event::Log { .. } => queue.logs += 1,
                Event::Hello { .. } | Event::Request { .. } => queue.requests += 1,
                Event::SessionClosed { .. } | Event::Connected { .. } | Event::Failed { .. } => {}
            }
            queue.events.push_back(event);
            queue.events.len() == 1
        };
        if was_empty {
            // (WouldBlock: the socket already holds unread wake-ups; one is enough)
            let _ = (&self.wake).write(&[1]);
        }
    }

    /// Hand up a HELLO, BIND or UNBIND, or the end of a session.
    pub fn control(&self, event: Event) {
        self.push(event);
    }

    /// True while requests may be queued without waiting.
    pub fn has_room(&self) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
            < MAX_QUEUED_REQUESTS
    }

    /// Wait until requests may be queued.
    pub async fn wait_room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_room() {
                return;
            }
            notified.await;
        }
    }

    /// Log a line through Python's logging (dropped, and counted, while the queue is full of them).
    pub fn log(&self, kind: &'static str, level: u8, message: String) {
        {
            let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.logs >= MAX_QUEUED_LOGS {
                self.dropped_logs.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.push(Event::Log {
            kind,
            level,
            message,
        });
    }

    /// Everything queued, oldest first.
    pub fn take(&self) -> Vec<Event> {
        let events: Vec<Event> = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.requests = 0;
            queue.logs = 0;
            queue.events.drain(..).collect()
        };
        self.room.notify_waiters();
        let dropped = self.dropped_logs.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let mut events = events;
            events.push(Event::Log {
                kind: "",
                level: WARNING,
                message: format!(
                    "{dropped} log lines of the relay's data plane were dropped (queue full)"
                ),
            });
            return events;
        }
        events
    }
}
