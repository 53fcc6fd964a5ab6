//! Direct messages, client to client over loopback TCP, 100-byte bodies.
//!
//! Three paths are measured, so the table shows what each layer costs:
//! - **raw TCP ping-pong** (the reference): 100 bytes out, 100 bytes back, nothing else.
//! - **protocol path**: the real peer protocol on [`proto`] alone — hellos and the peer
//!   link's Noise handshake (every frame after it encrypted), then each
//!   message sealed ([`Sessions::seal`]), framed and sent as [`PeerMsg::Envelope`], opened
//!   and checked by the receiver ([`Sessions::open`], [`ReplayGuard`]) and answered with
//!   [`PeerMsg::Ack`]. No local storage on either side.
//! - **peer runtime**: [`peer::Client::send`] between two real runtimes registered with a
//!   real discovery server; it returns when the receiver has stored and acked the message
//!   and the sender's outbox record is durable, so it includes both runtimes' durable
//!   local state (outbox, history, seen ids). Beside it: send → shown (the receiving
//!   runtime's message event), and the disk's own 4 KiB write + `fdatasync`, the floor of
//!   one durable commit, measured in the same folder, and a thread hand-off (a round trip
//!   to another thread that works 50 µs, beyond that work), what each hand-off of a
//!   message's work between threads costs on this machine. Then, as diagnostics without a
//!   target, the same runtime latency with the sender's, the receiver's or both runtimes'
//!   state on a RAM file system (`/dev/shm`, where there is one): both runtimes share one
//!   disk here, and these rows show what each side's commits add and what is left without
//!   any `fsync` (the CPU and the hand-offs).
//!
//! The throughput reference is the Olm ceiling: how many seal+open pairs (vodozemac's Olm
//! encrypt and decrypt of a 100-byte body) one core does.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use peer::DeliveryStatus;
use proto::{
    Connection, Envelope, Identity, MessageId, PeerMsg, Plaintext, ReplayGuard, Username,
    ratchet::{OwnAccount, PreKeyBundle, Sessions},
};
use store::{EmbeddedStore, MailLimits, Store};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{Bench, BenchError, Row, Target, stats::Latencies};

/// The body of every measured message: 100 bytes.
pub const BODY: &str = "p2pchat benchmark message, one hundred bytes long: the quick brown fox jumps over the lazy dog. ok!";
/// How long a hello or an ack may take before the benchmark gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages in flight on the pipelined protocol path.
const WINDOW: usize = peer::link::WINDOW;
/// Acks the pipelined receiver writes per flush at most.
const ACK_BATCH: usize = 64;
/// Runtime sends in flight for the runtime throughput figure: more than the runtime's
/// per-link window ([`peer`]'s 1024), so its window stays full.
const RUNTIME_IN_FLIGHT: usize = 4096;
/// The design's latency targets: p50 within this of raw TCP, p99 under the second.
const P50_OVER_RAW_US: f64 = 25.0;
const P99_TARGET_US: f64 = 250.0;
/// The design's throughput target for the peer runtime, as a share of the seal+open
/// ceiling.
const RUNTIME_SHARE_OF_CEILING: f64 = 0.5;
/// The design's latency target for the peer runtime: raw TCP p50 plus this many fsyncs.
const RUNTIME_FSYNCS_AT_P50: f64 = 1.3;
/// The most send → shown times kept unread (a throughput run sends far more).
const SHOWN_KEPT: usize = 1024;
/// The original Python demo's send → shown p50, measured on this machine kind (µs).
const ORIGINAL_SHOWN_P50_US: f64 = 630.0;

/// Sample counts and time budgets for one mode.
struct Sizes {
    round_trips: usize,
    round_trip_budget: Duration,
    runtime_sends: usize,
    runtime_budget: Duration,
    pipelined: usize,
    ceiling_budget: Duration,
    handoffs: usize,
}

fn sizes(bench: &Bench) -> Sizes {
    bench.mode.pick(
        Sizes {
            round_trips: 50_000,
            round_trip_budget: Duration::from_secs(5),
            runtime_sends: 200_000,
            runtime_budget: Duration::from_secs(10),
            pipelined: 300_000,
            ceiling_budget: Duration::from_secs(2),
            handoffs: 5_000,
        },
        Sizes {
            round_trips: 200,
            round_trip_budget: Duration::from_millis(300),
            runtime_sends: 20,
            runtime_budget: Duration::from_millis(500),
            pipelined: 500,
            ceiling_budget: Duration::from_millis(50),
            handoffs: 50,
        },
    )
}

/// Latency rows: raw TCP p50/p99 and one disk write + `fdatasync` (the references), then
/// the peer runtime (send → delivered, and send → shown at the recipient) and the protocol
/// path against them.
pub async fn latency_rows(bench: &Bench) -> Result<Vec<Row>, BenchError> {
    let sizes = sizes(bench);
    let mut raw = raw_ping_pong(sizes.round_trips, sizes.round_trip_budget).await?;
    let ProtocolLatencies {
        round_trips: mut protocol,
        mut seal,
        mut open,
    } = protocol_latency(sizes.round_trips, sizes.round_trip_budget).await?;
    // The message's own cryptography (Olm seal at the sender, open at the receiver), timed
    // inside the protocol path's round trips: the transport's allowance is on top of it.
    let crypto_p50 = seal.percentile_us(50.0) + open.percentile_us(50.0);
    let pair = RuntimePair::start(None).await?;
    let runtime = pair
        .latency(sizes.runtime_sends, sizes.runtime_budget)
        .await;
    pair.stop().await;
    let (mut runtime, mut shown, mut fsync) = runtime?;
    let placed = placed_latencies(&sizes).await?;
    let mut handoff = handoff_round_trips(sizes.handoffs).await?;

    let (raw_p50, raw_p99) = (raw.percentile_us(50.0), raw.percentile_us(99.0));
    let fsync_p50 = fsync.percentile_us(50.0);
    let raw_note = format!(
        "raw TCP reference: {} round trips of 100 bytes on one loopback connection (tokio, nodelay)",
        raw.len()
    );
    let runtime_note = "peer::Client::send → Delivered, alice → bob, two runtimes on one discovery server, link kept; durable on both sides (the receiver's redb commit, with fsync, before its ack; the sender's outbox record committed while the envelope travels)";
    let mut rows = vec![
        Row::new(
            "disk: 4 KiB write + fdatasync p50",
            fsync_p50,
            "µs",
            Target::Reported,
        )
        .with_target_text("reference")
        .with_note(format!(
            "{} samples, one after each peer-runtime send below: a 4 KiB write at the start of one file, then fdatasync, in the temporary folder the runtimes keep their state in; p99 {} µs.",
            fsync.len(),
            crate::report::number(fsync.percentile_us(99.0))
        )),
        Row::new(
            "thread hand-off: a round trip to a thread that works 50 µs, beyond the work, p50",
            handoff.percentile_us(50.0),
            "µs",
            Target::Reported,
        )
        .with_target_text("reference")
        .with_note(format!(
            "{} samples: one thread sends a request over a std channel to another, which spins {} µs and answers; the time beyond that work. Both threads wait long enough to sleep, so this is what handing a message's work to another thread and back costs on this machine (raw TCP's round trip pays two such wake-ups too); p99 {} µs.",
            handoff.len(),
            HANDOFF_WORK.as_micros(),
            crate::report::number(handoff.percentile_us(99.0))
        )),
        Row::new(
            "direct latency p50 (peer runtime)",
            runtime.percentile_us(50.0),
            "µs",
            Target::AtMost(raw_p50 + RUNTIME_FSYNCS_AT_P50 * fsync_p50),
        )
        .with_target_text("raw p50 + 1.3 × fsync p50")
        .with_reference("raw TCP p50", raw_p50)
        .with_note(format!(
            "{} samples; {runtime_note}; fsync p50 {} µs in the same run; {raw_note}.",
            runtime.len(),
            crate::report::number(fsync_p50)
        )),
        Row::new(
            "direct latency p99 (peer runtime)",
            runtime.percentile_us(99.0),
            "µs",
            Target::AtMost(2.0 * (raw_p99 + fsync_p50)),
        )
        .with_target_text("2 × (raw p99 + fsync p50)")
        .with_reference("raw TCP p99", raw_p99),
        Row::new(
            "direct: send → shown at the recipient p50",
            shown.percentile_us(50.0),
            "µs",
            Target::Reported,
        )
        .with_reference("the original's send → shown p50", ORIGINAL_SHOWN_P50_US)
        .with_note(format!(
            "{} samples: from peer::Client::send to the receiving runtime's Event::Message (what a person sees); the original Python demo, which stores and acks nothing, showed 630 µs p50 on this machine kind (2026-12-02).",
            shown.len()
        )),
        Row::new(
            "direct latency p50 (protocol path)",
            protocol.percentile_us(50.0),
            "µs",
            Target::AtMost(raw_p50 + P50_OVER_RAW_US + crypto_p50),
        )
        .with_target_text("raw p50 + 25 µs + Olm seal+open p50")
        .with_reference("raw TCP p50", raw_p50)
        .with_note(format!(
            "{} samples; proto Connection + Olm Sessions::seal/open + ReplayGuard, PeerMsg::Envelope → PeerMsg::Ack on loopback TCP; no local storage; the Olm seal and open inside these round trips took {} + {} µs p50 (the transport and protocol get 25 µs on top of raw TCP and that); {raw_note}.",
            protocol.len(),
            crate::report::number(seal.percentile_us(50.0)),
            crate::report::number(open.percentile_us(50.0))
        )),
        Row::new(
            "direct latency p99 (protocol path)",
            protocol.percentile_us(99.0),
            "µs",
            Target::AtMost(P99_TARGET_US),
        )
        .with_reference("raw TCP p99", raw_p99),
    ];
    for (in_ram, mut latencies) in placed {
        rows.push(
            Row::new(
                format!("direct latency p50 (peer runtime), {}", in_ram.label()),
                latencies.percentile_us(50.0),
                "µs",
                Target::Reported,
            )
            .with_reference("on the disk, above", runtime.percentile_us(50.0))
            .with_note(format!(
                "{} samples, as the peer runtime row, with {} on a RAM file system ({RAM_FS}, where fdatasync costs about a microsecond): {}. Both runtimes share one disk here; on two machines each peer has a disk of its own.",
                latencies.len(),
                in_ram.whose(),
                in_ram.shows()
            )),
        );
    }
    Ok(rows)
}

/// A RAM file system, where the diagnostic runtime pairs keep some of their state.
const RAM_FS: &str = "/dev/shm";

/// Which runtimes of a diagnostic [`RuntimePair`] keep their state on [`RAM_FS`] (the
/// others, and both in the rows with targets, keep it on the disk).
#[derive(Clone, Copy, Debug)]
enum InRam {
    /// The sender's (alice's): the receiver's commit is the only one that reaches the disk.
    Sender,
    /// The receiver's (bob's): the sender's commit is the only one that reaches the disk.
    Receiver,
    /// Both: no `fsync` costs anything; what is left is the CPU and the hand-offs.
    Both,
}

impl InRam {
    /// Whether `name`'s state goes on [`RAM_FS`].
    fn holds(self, name: &str) -> bool {
        match self {
            Self::Sender => name == "alice",
            Self::Receiver => name == "bob",
            Self::Both => true,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Sender => "sender's state in RAM",
            Self::Receiver => "receiver's state in RAM",
            Self::Both => "both states in RAM",
        }
    }

    /// What a run with this placement shows.
    fn shows(self) -> &'static str {
        match self {
            Self::Sender => "only the receiver's commit, the one before its ack, reaches the disk",
            Self::Receiver => {
                "only the sender's commit, made while the envelope travels, reaches the disk"
            }
            Self::Both => {
                "no commit waits for the disk, so what is left is the CPU and the thread hand-offs"
            }
        }
    }

    fn whose(self) -> &'static str {
        match self {
            Self::Sender => "the sender's (alice's) state",
            Self::Receiver => "the receiver's (bob's) state",
            Self::Both => "both runtimes' state",
        }
    }
}

/// send → delivered with some state on [`RAM_FS`], each placement a pair of its own run
/// for half the runtime budget; none where there is no such file system.
async fn placed_latencies(sizes: &Sizes) -> Result<Vec<(InRam, Latencies)>, BenchError> {
    if !std::path::Path::new(RAM_FS).is_dir() {
        return Ok(Vec::new());
    }
    let mut placed = Vec::new();
    for in_ram in [InRam::Sender, InRam::Receiver, InRam::Both] {
        let pair = RuntimePair::start(Some(in_ram)).await?;
        let latencies = pair
            .latency(sizes.runtime_sends, sizes.runtime_budget / 2)
            .await;
        pair.stop().await;
        placed.push((in_ram, latencies?.0));
    }
    Ok(placed)
}

/// The work the other thread of [`handoff_round_trips`] does before it answers.
const HANDOFF_WORK: Duration = Duration::from_micros(50);

/// Round trips to another thread that does [`HANDOFF_WORK`] of work for each request,
/// less that work: what waking a thread that went to sleep, and being woken by it, costs.
async fn handoff_round_trips(count: usize) -> Result<Latencies, BenchError> {
    tokio::task::spawn_blocking(move || {
        let (requests, worker_requests) = std::sync::mpsc::channel::<()>();
        let (worker_answers, answers) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            while worker_requests.recv().is_ok() {
                let started = Instant::now();
                while started.elapsed() < HANDOFF_WORK {
                    std::hint::spin_loop();
                }
                if worker_answers.send(()).is_err() {
                    break;
                }
            }
        });
        let mut latencies = Latencies::with_capacity(count);
        for _ in 0..count {
            let started = Instant::now();
            if requests.send(()).is_err() || answers.recv().is_err() {
                break;
            }
            latencies.record(started.elapsed().saturating_sub(HANDOFF_WORK));
        }
        drop(requests);
        let _ = worker.join();
        latencies
    })
    .await
    .map_err(|error| BenchError::Protocol(format!("hand-off probe: {error}")))
}

/// One file in the runtime's folder, written 4 KiB at a time and `fdatasync`ed: what one
/// durable write costs at least on this disk, sampled between the runtime's sends so both
/// see the disk as busy (or as quiet) as the other.
struct DiskProbe {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl DiskProbe {
    fn create(folder: &std::path::Path) -> Result<Self, BenchError> {
        let path = folder.join("fsync-probe");
        let file = std::fs::File::create(&path)?;
        Ok(Self { file, path })
    }

    /// One 4 KiB write at the start of the file, then `fdatasync`; how long both took.
    fn sample(&mut self) -> Result<Duration, BenchError> {
        use std::os::unix::fs::FileExt;
        let block = [0x5a_u8; 4096];
        let started = Instant::now();
        self.file.write_all_at(&block, 0)?;
        self.file.sync_data()?;
        Ok(started.elapsed())
    }
}

impl Drop for DiskProbe {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Throughput rows: the Olm ceiling (the reference), then the peer runtime and the
/// pipelined protocol path against it.
pub async fn throughput_rows(bench: &Bench) -> Result<Vec<Row>, BenchError> {
    let sizes = sizes(bench);
    let ceiling = olm_ceiling(sizes.ceiling_budget).await?;
    let protocol = protocol_throughput(sizes.pipelined).await?;
    let pair = RuntimePair::start(None).await?;
    let runtime = pair
        .throughput(sizes.runtime_sends, sizes.runtime_budget)
        .await;
    pair.stop().await;
    let (runtime_count, runtime_rate) = runtime?;
    Ok(vec![
        Row::new(
            "direct throughput (peer runtime)",
            runtime_rate,
            "msg/s",
            Target::AtLeast(RUNTIME_SHARE_OF_CEILING * ceiling),
        )
        .with_target_text("0.5 × the ceiling")
        .with_reference("Olm ceiling", ceiling)
        .with_note(format!(
            "{runtime_count} messages, up to {RUNTIME_IN_FLIGHT} concurrent Client::send calls to one recipient; the runtime pipelines them over one link (window 1024), the receiver stores each arrived batch in one durable commit before acking it, and the sender's outbox records and results are group-committed too. Olm ceiling: Sessions::seal then Sessions::open (vodozemac Olm encrypt + decrypt, pre-key messages as on a one-way link) of a 100-byte body in a loop on one thread."
        )),
        Row::new(
            "direct throughput (protocol path, pipelined)",
            protocol,
            "msg/s",
            Target::AtLeast(ceiling),
        )
        .with_target_text("≥ the Olm ceiling")
        .with_reference("Olm ceiling", ceiling)
        .with_note(format!(
            "{} messages sealed, sent, opened, checked and acked with up to {WINDOW} in flight on one Noise-encrypted link; no local storage.",
            sizes.pipelined
        )),
    ])
}

/// Round trips of 100 bytes on one loopback TCP connection.
pub async fn raw_ping_pong(count: usize, budget: Duration) -> Result<Latencies, BenchError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let address = listener.local_addr()?;
    let echo: JoinHandle<Result<(), BenchError>> = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let mut buffer = [0u8; BODY.len()];
        // Ends when the client closes (read_exact fails with an unexpected end).
        while stream.read_exact(&mut buffer).await.is_ok() {
            stream.write_all(&buffer).await?;
        }
        Ok(())
    });
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let mut buffer = [0u8; BODY.len()];
    let mut latencies = Latencies::with_capacity(count);
    let started = Instant::now();
    for round in 0..count + warm_up(count) {
        if started.elapsed() > budget {
            break;
        }
        let sent = Instant::now();
        stream.write_all(BODY.as_bytes()).await?;
        tokio::time::timeout(STEP_TIMEOUT, stream.read_exact(&mut buffer))
            .await
            .map_err(|_| BenchError::Timeout("raw echo".into()))??;
        if round >= warm_up(count) {
            latencies.record(sent.elapsed());
        }
    }
    drop(stream);
    echo.await
        .map_err(|error| BenchError::Protocol(format!("echo task: {error}")))??;
    Ok(latencies)
}

/// Round trips not recorded before the measured ones.
fn warm_up(count: usize) -> usize {
    (count / 20).min(1000)
}

/// One side of a conversation: an Olm account and the sessions with the other side.
pub(crate) struct Side {
    peer: Username,
    account: OwnAccount,
    sessions: Sessions,
}

impl Side {
    /// Seals `body` for the other side.
    pub(crate) fn seal(&mut self, body: &str) -> Result<Envelope, BenchError> {
        Ok(self.sessions.seal(
            &self.account,
            &self.peer,
            MessageId::random(),
            body,
            proto::now_ms(),
        )?)
    }
}

/// Both sides of a new conversation from `alice` to `bob`: alice's session started from
/// one of bob's one-time keys, as a real first message starts one (bob's side has none
/// until alice's first message arrives).
pub(crate) fn start_conversation(
    alice: (&Identity, &Username),
    bob: (&Identity, &Username),
) -> Result<(Side, Side), BenchError> {
    let mut bob_account = OwnAccount::generate(bob.0, bob.1);
    let published = bob_account.prekeys_to_publish(bob.0, 0);
    bob_account.mark_published();
    let bundle = PreKeyBundle {
        olm_key: published.olm_key,
        prekey: published.one_time.into_iter().next().ok_or_else(|| {
            BenchError::Protocol("a new account published no one-time key".into())
        })?,
        fallback: false,
    };
    let alice_account = OwnAccount::generate(alice.0, alice.1);
    let mut alice_sessions = Sessions::default();
    alice_sessions.start(&alice_account, bob.1, bob.0.public(), &bundle)?;
    Ok((
        Side {
            peer: bob.1.clone(),
            account: alice_account,
            sessions: alice_sessions,
        },
        Side {
            peer: alice.1.clone(),
            account: bob_account,
            sessions: Sessions::default(),
        },
    ))
}

/// One sealed conversation between two fresh identities: alice's session with bob, started
/// from one of bob's one-time keys as a real first message would (every message alice seals
/// is then a pre-key message until bob answers, as on a one-way link).
struct Conversation {
    alice: Username,
    bob: Username,
    /// Both users' identities, for the links' Noise handshakes.
    alice_identity: Identity,
    bob_identity: Identity,
    /// Alice's side: seals for bob.
    sender: Mutex<Side>,
    /// Bob's side: opens alice's messages.
    receiver: Mutex<Side>,
}

impl Conversation {
    fn new() -> Result<Self, BenchError> {
        let (alice_identity, bob_identity) = (Identity::generate(), Identity::generate());
        let alice = user("alice");
        let bob = user("bob");
        let (sender, receiver) =
            start_conversation((&alice_identity, &alice), (&bob_identity, &bob))?;
        Ok(Self {
            sender: Mutex::new(sender),
            receiver: Mutex::new(receiver),
            alice,
            bob,
            alice_identity,
            bob_identity,
        })
    }

    fn seal(&self) -> Result<Envelope, BenchError> {
        lock(&self.sender).seal(BODY)
    }

    fn open(&self, envelope: &Envelope) -> Result<Plaintext, BenchError> {
        let mut side = lock(&self.receiver);
        let Side {
            account,
            sessions,
            peer,
            ..
        } = &mut *side;
        Ok(sessions
            .open(account, peer, self.alice_identity.public(), envelope)?
            .plaintext)
    }
}

/// A side's lock (a panic while holding it ends the benchmark anyway).
fn lock(side: &Mutex<Side>) -> std::sync::MutexGuard<'_, Side> {
    side.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A name from a literal known to be valid.
fn user(name: &str) -> Username {
    Username::new(name).unwrap_or_else(|_| unreachable!("benchmark names are valid"))
}

/// The receiver's work for one envelope: open, check, remember the id; the id to ack.
fn accept(
    conversation: &Conversation,
    guard: &mut ReplayGuard,
    envelope: &Envelope,
) -> Result<MessageId, BenchError> {
    let now = proto::now_ms();
    let plaintext = conversation.open(envelope)?;
    guard.admit(&plaintext, now)?;
    Ok(plaintext.id)
}

/// A fresh replay guard with the window the peer runtime uses.
fn replay_guard() -> ReplayGuard {
    ReplayGuard::new(peer::runtime::SEEN_RETENTION_MS)
}

/// Connects the sending side of the peer protocol: hellos, then [`PeerMsg::Hello`], then
/// waits for the receiver's "ready" (an ack of the all-zero id).
async fn dial(
    address: SocketAddr,
    conversation: &Conversation,
) -> Result<Connection<TcpStream>, BenchError> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let mut connection = Connection::new(stream);
    connection
        .dial_handshake(
            &conversation.alice_identity,
            &conversation.bob_identity.public().exchange,
            STEP_TIMEOUT,
        )
        .await?;
    connection
        .send(&PeerMsg::Hello {
            from: conversation.alice.clone(),
            to: conversation.bob.clone(),
        })
        .await?;
    match recv_peer(&mut connection).await? {
        PeerMsg::Ack { id } if id == MessageId([0; 16]) => Ok(connection),
        other => Err(BenchError::Protocol(format!(
            "expected ready, got {other:?}"
        ))),
    }
}

/// Accepts the receiving side: hellos, [`PeerMsg::Hello`] naming the pair, then "ready".
async fn answer(
    listener: &TcpListener,
    conversation: &Conversation,
) -> Result<Connection<TcpStream>, BenchError> {
    let (stream, _) = listener.accept().await?;
    stream.set_nodelay(true)?;
    let mut connection = Connection::new(stream);
    let secured = connection
        .accept_handshake(&conversation.bob_identity, STEP_TIMEOUT)
        .await?;
    if secured.remote_static != conversation.alice_identity.public().exchange {
        return Err(BenchError::Protocol("the dialer is not alice".into()));
    }
    match recv_peer(&mut connection).await? {
        PeerMsg::Hello { from, to } if from == conversation.alice && to == conversation.bob => {}
        other => {
            return Err(BenchError::Protocol(format!(
                "expected hello, got {other:?}"
            )));
        }
    }
    connection
        .send(&PeerMsg::Ack {
            id: MessageId([0; 16]),
        })
        .await?;
    Ok(connection)
}

async fn recv_peer(connection: &mut Connection<TcpStream>) -> Result<PeerMsg, BenchError> {
    tokio::time::timeout(STEP_TIMEOUT, connection.recv::<PeerMsg>())
        .await
        .map_err(|_| BenchError::Timeout("peer message".into()))??
        .ok_or_else(|| BenchError::Protocol("the peer closed the connection".into()))
}

/// The protocol path's round trips, and inside them the Olm seal (sender) and open
/// (receiver) of each message.
pub struct ProtocolLatencies {
    /// Send → ack.
    pub round_trips: Latencies,
    /// The sender's seal.
    pub seal: Latencies,
    /// The receiver's open and checks.
    pub open: Latencies,
}

/// Send → ack round trips on the protocol path, one message at a time.
pub async fn protocol_latency(
    count: usize,
    budget: Duration,
) -> Result<ProtocolLatencies, BenchError> {
    let conversation = Arc::new(Conversation::new()?);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let address = listener.local_addr()?;
    let receiving = Arc::clone(&conversation);
    let receiver: JoinHandle<Result<Latencies, BenchError>> = tokio::spawn(async move {
        let mut connection = answer(&listener, &receiving).await?;
        let mut guard = replay_guard();
        let mut opens = Latencies::with_capacity(count + warm_up(count));
        while let Some(message) = connection.recv::<PeerMsg>().await? {
            let PeerMsg::Envelope(envelope) = message else {
                return Err(BenchError::Protocol("expected an envelope".into()));
            };
            let opening = Instant::now();
            let id = accept(&receiving, &mut guard, &envelope)?;
            opens.record(opening.elapsed());
            connection.send(&PeerMsg::Ack { id }).await?;
        }
        Ok(opens)
    });
    let mut connection = dial(address, &conversation).await?;
    let mut latencies = Latencies::with_capacity(count);
    let mut seals = Latencies::with_capacity(count);
    let started = Instant::now();
    for round in 0..count + warm_up(count) {
        if started.elapsed() > budget {
            break;
        }
        let sent = Instant::now();
        let envelope = conversation.seal()?;
        if round >= warm_up(count) {
            seals.record(sent.elapsed());
        }
        connection
            .send(&PeerMsg::Envelope(envelope.clone()))
            .await?;
        match recv_peer(&mut connection).await? {
            PeerMsg::Ack { id } if id == envelope.id => {}
            other => {
                return Err(BenchError::Protocol(format!(
                    "expected an ack, got {other:?}"
                )));
            }
        }
        if round >= warm_up(count) {
            latencies.record(sent.elapsed());
        }
    }
    connection.close().await;
    drop(connection);
    let opens = receiver
        .await
        .map_err(|error| BenchError::Protocol(format!("receiver task: {error}")))??;
    Ok(ProtocolLatencies {
        round_trips: latencies,
        seal: seals,
        open: opens,
    })
}

/// Pipelined: up to [`WINDOW`] envelopes in flight on one link, as the runtime's
/// per-recipient task drives a kept link: write what the window allows, flush, then take
/// every answer that has arrived. The receiver likewise reads every envelope that has
/// arrived, then writes their acks in one flush. Every frame is sealed by the link's Noise
/// transport.
pub async fn protocol_throughput(count: usize) -> Result<f64, BenchError> {
    let conversation = Arc::new(Conversation::new()?);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let address = listener.local_addr()?;
    let receiving = Arc::clone(&conversation);
    let receiver: JoinHandle<Result<usize, BenchError>> = tokio::spawn(async move {
        let mut connection = answer(&listener, &receiving).await?;
        let mut guard = replay_guard();
        let mut received = 0;
        while let Some(first) = connection.recv::<PeerMsg>().await? {
            let mut next = Some(first);
            while let Some(message) = next {
                let PeerMsg::Envelope(envelope) = message else {
                    return Err(BenchError::Protocol("expected an envelope".into()));
                };
                let id = accept(&receiving, &mut guard, &envelope)?;
                connection.feed(&PeerMsg::Ack { id }).await?;
                received += 1;
                // Acks go out in small batches, so the sender refills its window while
                // this side opens the rest.
                if received % ACK_BATCH == 0 {
                    connection.flush().await?;
                }
                next = match connection.recv::<PeerMsg>().now_or_never() {
                    Some(message) => message?,
                    None => None,
                };
            }
            connection.flush().await?;
        }
        Ok(received)
    });

    let mut connection = dial(address, &conversation).await?;
    let started = Instant::now();
    let pipeline = async {
        let (mut sent, mut acked) = (0, 0);
        while acked < count {
            while sent < count && sent - acked < WINDOW {
                connection
                    .feed(&PeerMsg::Envelope(conversation.seal()?))
                    .await?;
                sent += 1;
            }
            connection.flush().await?;
            let mut answer = Some(connection.recv::<PeerMsg>().await?);
            while let Some(message) = answer {
                match message {
                    Some(PeerMsg::Ack { .. }) => acked += 1,
                    other => {
                        return Err(BenchError::Protocol(format!(
                            "expected an ack, got {other:?}"
                        )));
                    }
                }
                answer = if acked < sent {
                    connection.recv::<PeerMsg>().now_or_never().transpose()?
                } else {
                    None
                };
            }
        }
        Ok::<_, BenchError>(())
    };
    let budget = Duration::from_secs(120);
    tokio::time::timeout(budget, pipeline)
        .await
        .map_err(|_| BenchError::Timeout(format!("{count} pipelined messages in {budget:?}")))??;
    let elapsed = started.elapsed();
    drop(connection);
    let received = receiver
        .await
        .map_err(|error| BenchError::Protocol(format!("receiver task: {error}")))??;
    if received != count {
        return Err(BenchError::Protocol(format!(
            "sent {count}, the receiver took {received}"
        )));
    }
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// Seal+open pairs per second on one thread, for `budget`.
pub async fn olm_ceiling(budget: Duration) -> Result<f64, BenchError> {
    tokio::task::spawn_blocking(move || {
        let conversation = Conversation::new()?;
        let started = Instant::now();
        let mut done = 0u64;
        // Bounded by time; checked every 256 pairs so the clock is not the cost.
        while started.elapsed() < budget {
            for _ in 0..256 {
                let envelope = conversation.seal()?;
                let opened = conversation.open(&envelope)?;
                std::hint::black_box(opened);
            }
            done += 256;
        }
        Ok(done as f64 / started.elapsed().as_secs_f64())
    })
    .await
    .map_err(|error| BenchError::Protocol(format!("ceiling task: {error}")))?
}

/// Starts the real discovery server in this process, on a free loopback port, over an
/// embedded store in `folder` (created); it stops when `shutdown` is cancelled.
pub async fn in_process_server(
    folder: &std::path::Path,
    shutdown: &CancellationToken,
) -> Result<SocketAddr, BenchError> {
    in_process_server_with(folder, discovery::Config::default(), shutdown).await
}

/// [`in_process_server`] with `config`.
pub async fn in_process_server_with(
    folder: &std::path::Path,
    config: discovery::Config,
    shutdown: &CancellationToken,
) -> Result<SocketAddr, BenchError> {
    std::fs::create_dir_all(folder)?;
    let store = Store::Embedded(EmbeddedStore::open(
        folder.join("store.redb"),
        MailLimits::default(),
    )?);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let address = listener.local_addr()?;
    tokio::spawn(discovery::run(listener, store, config, shutdown.clone()));
    Ok(address)
}

/// Two peer runtimes (alice, bob) registered with one in-process discovery server, all
/// state in a temporary folder on disk.
struct RuntimePair {
    alice: peer::Client,
    bob_user: Username,
    bob: peer::Client,
    /// When bob's runtime handed over each message to show (its `Event::Message`); kept
    /// only while there is room, so a throughput run does not pile them up.
    shown: tokio::sync::Mutex<mpsc::Receiver<Instant>>,
    shutdown: CancellationToken,
    folder: tempfile::TempDir,
    /// The folder on [`RAM_FS`] holding the state [`InRam`] puts there, if any.
    _ram: Option<tempfile::TempDir>,
}

impl RuntimePair {
    /// Alice and bob with their state in a temporary folder on the disk, or some of it on
    /// [`RAM_FS`] (`in_ram`).
    async fn start(in_ram: Option<InRam>) -> Result<Self, BenchError> {
        let folder = tempfile::Builder::new()
            .prefix("p2pchat-bench-direct-")
            .tempdir()?;
        let ram = match in_ram {
            Some(in_ram) => Some((
                in_ram,
                tempfile::Builder::new()
                    .prefix("p2pchat-bench-direct-")
                    .tempdir_in(RAM_FS)?,
            )),
            None => None,
        };
        let shutdown = CancellationToken::new();
        let server = in_process_server(&folder.path().join("discovery"), &shutdown).await?;
        let mut clients = Vec::new();
        let (shown_tx, shown) = mpsc::channel(SHOWN_KEPT);
        for name in ["alice", "bob"] {
            let base = match &ram {
                Some((in_ram, ram)) if in_ram.holds(name) => ram.path(),
                _ => folder.path(),
            };
            let mut config = peer::Config::new(server.to_string(), user(name), base.join(name));
            config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
            let (client, mut events) = peer::start(config, shutdown.child_token()).await?;
            // Events are taken and dropped, as a bot would; the time of each message is
            // kept for the send → shown row.
            let shown_tx = shown_tx.clone();
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    if let peer::Event::Message(_) = event {
                        let _ = shown_tx.try_send(Instant::now());
                    }
                }
            });
            client.wait_online(STEP_TIMEOUT).await?;
            clients.push(client);
        }
        let (Some(bob), Some(alice)) = (clients.pop(), clients.pop()) else {
            unreachable!("two clients were started")
        };
        let pair = Self {
            alice,
            bob_user: user("bob"),
            bob,
            shown: tokio::sync::Mutex::new(shown),
            shutdown,
            folder,
            _ram: ram.map(|(_, folder)| folder),
        };
        // The first message looks bob up, pins his keys and dials him; later ones reuse the link.
        for _ in 0..3 {
            pair.send_one().await?;
        }
        Ok(pair)
    }

    async fn send_one(&self) -> Result<(), BenchError> {
        let report = tokio::time::timeout(STEP_TIMEOUT, self.alice.send(&self.bob_user, BODY))
            .await
            .map_err(|_| BenchError::Timeout("a runtime send".into()))??;
        match report.status {
            DeliveryStatus::Delivered => Ok(()),
            other => Err(BenchError::Protocol(format!(
                "expected a direct delivery, got {other:?}"
            ))),
        }
    }

    /// Sends one message at a time; returns send → delivered and send → shown (at bob's
    /// runtime) for each, and a disk probe's write + `fdatasync` taken after each.
    async fn latency(
        &self,
        count: usize,
        budget: Duration,
    ) -> Result<(Latencies, Latencies, Latencies), BenchError> {
        let mut delivered = Latencies::with_capacity(count);
        let mut shown = Latencies::with_capacity(count);
        let mut fsync = Latencies::with_capacity(count);
        let mut probe = DiskProbe::create(self.folder.path())?;
        let mut shown_at = self.shown.lock().await;
        let started = Instant::now();
        while delivered.len() < count && started.elapsed() < budget {
            while shown_at.try_recv().is_ok() {}
            let sent = Instant::now();
            self.send_one().await?;
            delivered.record(sent.elapsed());
            let at = tokio::time::timeout(STEP_TIMEOUT, shown_at.recv())
                .await
                .map_err(|_| BenchError::Timeout("a delivered message to be shown".into()))?
                .ok_or_else(|| BenchError::Protocol("the receiving runtime stopped".into()))?;
            shown.record(at.saturating_duration_since(sent));
            fsync.record(probe.sample()?);
        }
        Ok((delivered, shown, fsync))
    }

    /// Sends up to `count` messages (stopping to start new ones after `budget`) with up to
    /// [`RUNTIME_IN_FLIGHT`] in flight; returns how many and the rate.
    async fn throughput(&self, count: usize, budget: Duration) -> Result<(usize, f64), BenchError> {
        let started = Instant::now();
        let mut in_flight = FuturesUnordered::new();
        let (mut started_sends, mut delivered) = (0usize, 0usize);
        loop {
            while in_flight.len() < RUNTIME_IN_FLIGHT
                && started_sends < count
                && started.elapsed() < budget
            {
                in_flight.push(self.send_one());
                started_sends += 1;
            }
            match in_flight.next().await {
                Some(result) => {
                    result?;
                    delivered += 1;
                }
                None => break,
            }
        }
        Ok((
            delivered,
            delivered as f64 / started.elapsed().as_secs_f64(),
        ))
    }

    async fn stop(self) {
        self.alice.shutdown(Duration::from_secs(3)).await;
        self.bob.shutdown(Duration::from_secs(3)).await;
        self.shutdown.cancel();
    }
}
