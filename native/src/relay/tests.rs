//! The session's state machine driven through an in-memory link: an agent
//! played by the test, frame by frame, against [`Session::serve`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::events::{Event, Events};
use super::session::{code, Message, Session, Stream};
use super::tls::{Identities, Resolver};
use super::{Config, Shared, Tunnel};
use crate::frames::{self, FrameType, HEADER_SIZE};

/// A P-256 key for the dev leaves the tests never serve (the resolver needs one).
const TEST_KEY: &[u8] = b"-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgnd/8DLHW5mDYIKA0
gyqFjsukaaccV0GLvBZbmbGGvnuhRANCAASqib8GXmaY7RsJwUvZoL4Xtyi9kGnu
C9awqbY/mxsiEOowGrjSmSIRpd6JlYAGMulFWiP7Ww+CVYUL71xstDfa
-----END PRIVATE KEY-----
";

const WINDOW: u32 = 16 * 1024;
const WAIT: Duration = Duration::from_secs(5);

fn shared() -> (Arc<Shared>, std::os::unix::net::UnixStream) {
    shared_with(WINDOW, 0, 0)
}

fn shared_with(
    base_window: u32,
    session_budget: i64,
    relay_budget: i64,
) -> (Arc<Shared>, std::os::unix::net::UnixStream) {
    let config = Config {
        domain: "localhost".into(),
        handshake_timeout: Duration::from_secs(10),
        hello_timeout: Duration::from_secs(10),
        heartbeat_timeout: Duration::from_secs(60),
        window: WINDOW,
        base_window,
        session_budget,
        max_frame: frames::MAX_FRAME_PAYLOAD,
        max_pending: 16,
        max_pending_per_source: 16,
        max_streams_per_session: 100,
        max_streams_per_tunnel: 100,
        fd_ceiling: i64::MAX,
    };
    let (events, watched) = Events::new().unwrap();
    let identities = Identities::new(Resolver::per_host(TEST_KEY).unwrap(), None).unwrap();
    (
        Arc::new(Shared::new(config, events, identities, relay_budget)),
        watched,
    )
}

/// The agent's end of the link.
struct Agent {
    io: DuplexStream,
    buf: Vec<u8>,
}

impl Agent {
    async fn send(&mut self, kind: FrameType, stream_id: u32, payload: &[u8]) {
        let mut out = Vec::new();
        frames::encode(kind, stream_id, payload, &mut out).unwrap();
        self.io.write_all(&out).await.unwrap();
    }

    /// The next frame from the relay, or None at the link's end.
    async fn next(&mut self) -> Option<(FrameType, u32, Vec<u8>)> {
        loop {
            if let Some(header) =
                frames::parse_header(&self.buf, frames::MAX_FRAME_PAYLOAD).unwrap()
            {
                let end = HEADER_SIZE + header.length as usize;
                if self.buf.len() >= end {
                    let payload = self.buf[HEADER_SIZE..end].to_vec();
                    self.buf.drain(..end);
                    return Some((header.kind, header.stream_id, payload));
                }
            }
            let mut chunk = [0u8; 65536];
            let read = tokio::time::timeout(WAIT, self.io.read(&mut chunk))
                .await
                .expect("the relay said nothing in time")
                .unwrap_or(0);
            if read == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..read]);
        }
    }

    /// The next frame other than PING.
    async fn expect(&mut self, kind: FrameType) -> (u32, Vec<u8>) {
        loop {
            let (got, stream_id, payload) = self.next().await.expect("the link ended");
            if got == FrameType::Ping {
                continue;
            }
            assert_eq!(got, kind, "payload {:?}", String::from_utf8_lossy(&payload));
            return (stream_id, payload);
        }
    }
}

/// A session on an in-memory link, its agent, and its id once HELLO has been handed up.
async fn session(shared: &Arc<Shared>) -> (Agent, Arc<Session>) {
    let (relay_end, agent_end) = tokio::io::duplex(1 << 20);
    let slot = shared.admit("127.0.0.1".parse().unwrap()).unwrap();
    tokio::spawn(Session::serve(
        shared.clone(),
        relay_end,
        "127.0.0.1:1".into(),
        slot,
    ));
    let mut agent = Agent {
        io: agent_end,
        buf: Vec::new(),
    };
    agent.send(FrameType::Hello, 0, b"{\"hello\": 1}").await;
    let id = wait_for_event(shared, |event| match event {
        Event::Hello {
            session, payload, ..
        } if payload == b"{\"hello\": 1}" => Some(session.clone()),
        _ => None,
    })
    .await;
    let session = shared.session(&id).expect("the session is registered");
    (agent, session)
}

async fn wait_for_event<T>(shared: &Shared, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for event in shared.events.take() {
            if let Some(found) = pick(&event) {
                return found;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no such event in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn welcomed(shared: &Arc<Shared>) -> (Agent, Arc<Session>) {
    let (mut agent, session) = session(shared).await;
    session.welcome(b"\x02\x00\x00\x00\x00\x00\x00\x00\x00\x02{}", WINDOW, 1024);
    let (_, payload) = agent.expect(FrameType::Welcome).await;
    assert_eq!(payload, b"{}");
    (agent, session)
}

async fn goaway_code(agent: &mut Agent) -> (u16, String) {
    let (_, payload) = agent.expect(FrameType::GoAway).await;
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    (code, String::from_utf8_lossy(&payload[2..]).into_owned())
}

#[tokio::test]
async fn hello_goes_up_welcome_comes_down_and_pings_are_answered() {
    let (shared, _watched) = shared();
    let (mut agent, session) = welcomed(&shared).await;
    assert_eq!(session.state(), super::session::State::Open);
    agent.send(FrameType::Ping, 0, &7u64.to_be_bytes()).await;
    let (_, pong) = agent.expect(FrameType::Pong).await;
    assert_eq!(pong, 7u64.to_be_bytes());
    // a pending-handshake slot is held until WELCOME, then given back
    assert_eq!(super::lock(&shared.pending).total, 0);
}

#[tokio::test]
async fn a_stream_carries_bytes_both_ways_and_counts_what_waits() {
    let (shared, _watched) = shared();
    let (mut agent, session) = welcomed(&shared).await;
    let tunnel = Arc::new(Tunnel::new("abc", i64::MAX / 4));
    let stream = session.open_stream(&tunnel, "203.0.113.9:4000").unwrap();
    let (stream_id, open) = agent.expect(FrameType::Open).await;
    assert_eq!(stream_id, stream.id);
    assert_eq!(
        open,
        b"{\"tunnel\": \"abc\", \"peer\": \"203.0.113.9:4000\"}"
    );
    session.send_data(&stream, b"to the agent");
    assert_eq!(
        agent.expect(FrameType::Data).await,
        (stream.id, b"to the agent".to_vec())
    );
    agent
        .send(FrameType::Data, stream.id, b"to the client")
        .await;
    let Message::Data(held) = stream.next_message().await else {
        panic!("no DATA for the stream")
    };
    assert_eq!(&held.data[..], b"to the client");
    assert_eq!(tunnel.stats.buffered.load(Ordering::Relaxed), 13);
    drop(held);
    assert_eq!(tunnel.stats.buffered.load(Ordering::Relaxed), 0);
    agent.send(FrameType::Fin, stream.id, b"").await;
    assert!(matches!(stream.next_message().await, Message::Fin));
}

#[tokio::test]
async fn credit_comes_back_at_half_a_window() {
    let (shared, _watched) = shared();
    let (mut agent, session) = welcomed(&shared).await;
    let tunnel = Arc::new(Tunnel::new("abc", i64::MAX / 4));
    let stream = session.open_stream(&tunnel, "peer").unwrap();
    agent.expect(FrameType::Open).await;
    let mut unacked = 0;
    session.consumed(&stream, &mut unacked, (WINDOW / 2 - 1) as usize);
    session.consumed(&stream, &mut unacked, 1);
    let (stream_id, grant) = agent.expect(FrameType::Window).await;
    assert_eq!(
        (stream_id, grant),
        (stream.id, (WINDOW / 2).to_be_bytes().to_vec())
    );
    assert_eq!(unacked, 0);
}

#[tokio::test]
async fn data_beyond_the_window_ends_the_session_with_flow_control() {
    let (shared, _watched) = shared();
    let (mut agent, session) = welcomed(&shared).await;
    let tunnel = Arc::new(Tunnel::new("abc", i64::MAX / 4));
    let stream = session.open_stream(&tunnel, "peer").unwrap();
    agent.expect(FrameType::Open).await;
    agent
        .send(FrameType::Data, stream.id, &vec![1; WINDOW as usize])
        .await;
    agent.send(FrameType::Data, stream.id, b"x").await;
    assert_eq!(
        goaway_code(&mut agent).await,
        (
            code::FLOW_CONTROL,
            format!("stream {} overran its window", stream.id)
        )
    );
    // the stream's client is reset (its DATA within the window came first), and the
    // control plane learns the session is gone
    let mut reset = false;
    while let Ok(message) = tokio::time::timeout(WAIT, stream.next_message()).await {
        if matches!(message, Message::Reset(code::CANCELLED)) {
            reset = true;
            break;
        }
    }
    assert!(reset);
    let id = session.id.clone();
    wait_for_event(&shared, |e| {
        matches!(e, Event::SessionClosed { session } if *session == id).then_some(())
    })
    .await;
}

#[tokio::test]
async fn frames_out_of_place_are_protocol_errors_with_the_reference_wording() {
    let cases: [(FrameType, u32, &[u8], &str); 5] = [
        (
            FrameType::Window,
            7,
            &[0, 0, 0, 1],
            "WINDOW on unopened stream 7",
        ),
        (FrameType::Open, 1, b"{}", "relay got OPEN while open"),
        (FrameType::Hello, 0, b"{}", "relay got HELLO while open"),
        (FrameType::Ping, 0, b"short", "PING payload is not 8 bytes"),
        (FrameType::Fin, 9, b"x", "FIN with a payload"),
    ];
    for (kind, stream_id, payload, message) in cases {
        let (shared, _watched) = shared();
        let (mut agent, _session) = welcomed(&shared).await;
        agent.send(kind, stream_id, payload).await;
        assert_eq!(
            goaway_code(&mut agent).await,
            (code::PROTOCOL_ERROR, message.to_owned())
        );
        assert!(
            agent.next().await.is_none(),
            "the link stays open after {message}"
        );
    }
}

#[tokio::test]
async fn nothing_but_hello_is_taken_before_it() {
    let (shared, _watched) = shared();
    let (relay_end, agent_end) = tokio::io::duplex(1 << 16);
    let slot = shared.admit("127.0.0.1".parse().unwrap()).unwrap();
    tokio::spawn(Session::serve(
        shared.clone(),
        relay_end,
        "peer".into(),
        slot,
    ));
    let mut agent = Agent {
        io: agent_end,
        buf: Vec::new(),
    };
    agent.send(FrameType::Bind, 0, b"{}").await;
    assert_eq!(
        goaway_code(&mut agent).await,
        (
            code::PROTOCOL_ERROR,
            "relay got BIND while handshake".to_owned()
        )
    );
    // the slot it held as a pending handshake is free again
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(super::lock(&shared.pending).total, 0);
}

/// Open a stream: its OPEN comes alone (the next frame each test expects is not a WINDOW),
/// nothing lent beyond the base window yet.
async fn open(agent: &mut Agent, session: &Session, tunnel: &Arc<Tunnel>) -> Arc<Stream> {
    let opened = session.open_stream(tunnel, "peer").unwrap();
    agent.expect(FrameType::Open).await;
    opened
}

/// `size` bytes of the stream left the process: the WINDOW the agent gets.
async fn consume(agent: &mut Agent, session: &Session, stream: &Stream, size: usize) -> u32 {
    let mut unacked = 0;
    session.consumed(stream, &mut unacked, size);
    let (id, grant) = agent.expect(FrameType::Window).await;
    assert_eq!(id, stream.id);
    u32::from_be_bytes(grant.try_into().unwrap())
}

#[tokio::test]
async fn credit_beyond_the_base_window_comes_from_the_budgets_at_the_first_grant_and_goes_back() {
    let base = 4 * 1024;
    let extra = WINDOW - base; // 12 KiB a stream, when the budgets have it
                               // the session may lend 20 KiB, the relay 100 KiB: the session's budget binds
    let (shared, _watched) = shared_with(base, 20 * 1024, 100 * 1024);
    let (mut agent, session) = welcomed(&shared).await;
    let tunnel = Arc::new(Tunnel::new("abc", i64::MAX / 4));
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(open(&mut agent, &session, &tunnel).await);
    }
    assert_eq!(shared.budget.left(), 100 * 1024); // (idle streams hold nothing)
    let mut grants = Vec::new();
    for stream in &streams[..2] {
        grants.push(consume(&mut agent, &session, stream, base as usize / 2).await);
    }
    assert_eq!(grants, [base / 2 + extra, base / 2 + 20 * 1024 - extra]);
    assert_eq!(shared.budget.left(), 100 * 1024 - 20 * 1024);
    // the third stream gets the bytes it used back, and nothing lent: the session's budget is out
    let third = &streams[2];
    assert_eq!(
        consume(&mut agent, &session, third, base as usize / 2).await,
        base / 2
    );
    // so it may send its base window and what was granted back, and no more
    agent
        .send(
            FrameType::Data,
            third.id,
            &vec![0; (base + base / 2) as usize],
        )
        .await;
    agent.send(FrameType::Data, third.id, b"x").await;
    assert_eq!(goaway_code(&mut agent).await.0, code::FLOW_CONTROL);
    // the session is gone: every stream's extra credit is back in the relay's budget
    drop(streams);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(shared.budget.left(), 100 * 1024);
}

#[tokio::test]
async fn a_tunnel_takes_at_most_its_share_and_leaves_the_rest_to_the_others() {
    let base = 4 * 1024;
    let extra = WINDOW - base;
    let (shared, _watched) = shared_with(base, 100 * 1024, 100 * 1024);
    let (mut agent, session) = welcomed(&shared).await;
    // a share of one stream's extra credit each
    let stalled = Arc::new(Tunnel::new("stalled", i64::from(extra)));
    let other = Arc::new(Tunnel::new("other", i64::from(extra)));
    let mut grants = Vec::new();
    let mut streams = Vec::new();
    for tunnel in [&stalled, &stalled, &other] {
        let stream = open(&mut agent, &session, tunnel).await;
        grants.push(consume(&mut agent, &session, &stream, base as usize / 2).await);
        streams.push(stream);
    }
    assert_eq!(grants, [base / 2 + extra, base / 2, base / 2 + extra]);
    assert_eq!(shared.budget.left(), 100 * 1024 - 2 * i64::from(extra));
    assert_eq!((stalled.budget.left(), other.budget.left()), (0, 0));
}

#[tokio::test]
async fn streams_of_a_tunnel_share_its_budget_evenly_and_a_stream_above_its_share_gives_back() {
    let base = 4 * 1024;
    let extra = WINDOW - base; // 12 KiB
    let (shared, _watched) = shared_with(base, 100 * 1024, 100 * 1024);
    let (mut agent, session) = welcomed(&shared).await;
    let tunnel = Arc::new(Tunnel::new("shared", i64::from(extra)));
    let first = open(&mut agent, &session, &tunnel).await;
    tunnel.stats.open.store(1, Ordering::Relaxed);
    // alone, the first stream may borrow the whole budget
    assert_eq!(
        consume(&mut agent, &session, &first, 2048).await,
        2048 + extra
    );
    let second = open(&mut agent, &session, &tunnel).await;
    tunnel.stats.open.store(2, Ordering::Relaxed);
    // the second finds the budget lent out: its bytes back, nothing more
    assert_eq!(consume(&mut agent, &session, &second, 2048).await, 2048);
    // at the first's next grant, what it holds beyond its half comes out of what it is granted
    let half = extra / 2;
    assert_eq!(
        consume(&mut agent, &session, &first, 8192).await,
        8192 - half
    );
    assert_eq!(tunnel.budget.left(), i64::from(half));
    // which the second then borrows
    assert_eq!(
        consume(&mut agent, &session, &second, 2048).await,
        2048 + half
    );
    assert_eq!(tunnel.budget.left(), 0);
}

#[test]
fn borrowing_takes_what_every_budget_of_the_chain_can_lend() {
    use super::{borrow, repay, Budget};
    let (a, b, c) = (Budget::new(10), Budget::new(4), Budget::new(7));
    assert_eq!(borrow(&[&a, &b, &c], 6), 4);
    assert_eq!((a.left(), b.left(), c.left()), (6, 0, 3));
    assert_eq!(borrow(&[&a, &b, &c], 6), 0);
    assert_eq!((a.left(), b.left(), c.left()), (6, 0, 3));
    repay(&[&a, &b, &c], 4);
    assert_eq!((a.left(), b.left(), c.left()), (10, 4, 7));
}
