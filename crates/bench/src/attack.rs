//! The discovery server under attack: lookup p99 while thousands of sockets connect and
//! never register (each reconnecting as soon as the registration deadline closes it) and
//! one registered client floods an offline user's mailbox with deposits, beside the same
//! lookups on the same server without the attack, measured first.
//!
//! The server is the real one in a child process (`serve-discovery`, embedded store on
//! tmpfs); the attack and the lookups run in this process, the silent sockets spread over
//! loopback source addresses as the clients of as many machines would be (the bench server
//! lifts the per-address limits, so what is measured is the cost of the attack, not a
//! refusal of it).

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use proto::{Identity, Reply, Request, Username};
use tokio::{io::AsyncReadExt, net::TcpSocket, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    Bench, BenchError, Row, Target,
    control::ControlClient,
    discovery_load::{self, LOOKUP_CONNECTIONS},
    system,
};

/// Silent sockets on one loopback source address.
const SOCKETS_PER_SOURCE: usize = 1_000;

/// Measures the attack row (see the module docs).
pub async fn rows(bench: &Bench) -> Result<Vec<Row>, BenchError> {
    system::raise_open_file_limit()?;
    let sockets = bench.mode.pick(10_000, 200);
    let lookup_time = bench
        .mode
        .pick(Duration::from_secs(5), Duration::from_millis(300));
    let folder = tempfile::Builder::new()
        .prefix("p2pchat-bench-attack-")
        .tempdir_in(discovery_load::tmpfs_or_temp())?;
    let server = discovery_load::spawn_server(bench, folder.path(), None, 10_000).await?;
    let result = measure(server.address, sockets, lookup_time).await;
    server.child.stop(Duration::from_secs(5)).await;
    let mut measured = result?;
    let quiet_p99 = measured.quiet.percentile_us(99.0) / 1000.0;
    let attacked_p99 = measured.attacked.percentile_us(99.0) / 1000.0;
    Ok(vec![
        Row::new(
            "discovery: lookup p99 under attack",
            attacked_p99,
            "ms",
            Target::AtMost(2.0 * quiet_p99),
        )
        .with_target_text("≤ 2 × the same lookups without the attack")
        .with_reference("lookup p99 without the attack", quiet_p99)
        .with_note(format!(
            "{LOOKUP_CONNECTIONS} registered connections, one lookup in flight each, for {:.1} s without, then with, the attack: {} sockets connected and silent (reconnecting when the registration deadline closes them; {} connections made in all), and one registered client depositing into an offline user's mailbox as fast as it is answered ({} deposits taken, {} refused over its budget). Lookups answered: {} without, {} with.",
            lookup_time.as_secs_f64(),
            sockets,
            measured.connections,
            measured.deposited,
            measured.over_budget,
            measured.quiet.len(),
            measured.attacked.len(),
        )),
    ])
}

struct Measured {
    quiet: crate::stats::Latencies,
    attacked: crate::stats::Latencies,
    connections: usize,
    deposited: usize,
    over_budget: usize,
}

async fn measure(
    server: SocketAddr,
    sockets: usize,
    lookup_time: Duration,
) -> Result<Measured, BenchError> {
    let targets = |index: usize| lookup_name(index % LOOKUP_CONNECTIONS);
    let (quiet, _, _) =
        discovery_load::lookup_load_of(&[server], "lookup", targets, lookup_time).await?;

    let stop = CancellationToken::new();
    let connections = Arc::new(AtomicUsize::new(0));
    let mut attack = JoinSet::new();
    for index in 0..sockets {
        let source = system::loopback_source(1_000 + index / SOCKETS_PER_SOURCE);
        attack.spawn(hold_silent(
            server,
            source,
            stop.clone(),
            connections.clone(),
        ));
    }
    // Every silent socket connected before the lookups start (bounded wait).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while connections.load(Ordering::Relaxed) < sockets && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flood = tokio::spawn(flood_deposits(server, stop.clone()));
    let attacked =
        discovery_load::lookup_load_of(&[server], "attacked", targets, lookup_time).await;
    stop.cancel();
    while attack.join_next().await.is_some() {}
    let (deposited, over_budget) = flood
        .await
        .map_err(|error| BenchError::Protocol(format!("flood task: {error}")))??;
    let (attacked, _, _) = attacked?;
    Ok(Measured {
        quiet,
        attacked,
        connections: connections.load(Ordering::Relaxed),
        deposited,
        over_budget,
    })
}

fn lookup_name(index: usize) -> Username {
    Username::new(&format!("lookup{index}")).unwrap_or_else(|_| unreachable!("valid by shape"))
}

/// One silent socket from `source`: connects, reads until the server closes it, connects
/// again, until `stop`.
async fn hold_silent(
    server: SocketAddr,
    source: Ipv4Addr,
    stop: CancellationToken,
    connections: Arc<AtomicUsize>,
) {
    while !stop.is_cancelled() {
        let connect = async {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((source, 0)))?;
            socket.connect(server).await
        };
        let mut stream = match connect.await {
            Ok(stream) => stream,
            Err(_) => {
                // Out of ports or files for a moment: wait rather than spin.
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        connections.fetch_add(1, Ordering::Relaxed);
        let mut buffer = [0u8; 256];
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                read = stream.read(&mut buffer) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
            }
        }
    }
}

/// One registered client depositing into an offline user's mailbox, one deposit in flight,
/// until `stop`: returns (taken, refused over the budget).
async fn flood_deposits(
    server: SocketAddr,
    stop: CancellationToken,
) -> Result<(usize, usize), BenchError> {
    let sink = Username::new("sink").unwrap_or_else(|_| unreachable!("valid"));
    let flooder = Username::new("flooder").unwrap_or_else(|_| unreachable!("valid"));
    let sink_identity = Identity::generate();
    // The sink registers once (binding its name), then leaves: its mail waits.
    ControlClient::connect(server, None)
        .await?
        .register(&sink_identity, &sink)
        .await?;
    let flooder_identity = Identity::generate();
    let mut client = ControlClient::connect(server, None).await?;
    client.register(&flooder_identity, &flooder).await?;
    let (mut sender, _) =
        crate::direct::start_conversation((&flooder_identity, &flooder), (&sink_identity, &sink))?;
    let (mut taken, mut refused) = (0, 0);
    // Bounded in count too, whatever the speed.
    for _ in 0..1_000_000 {
        if stop.is_cancelled() {
            break;
        }
        let envelope = sender.seal("buy now")?;
        match client.request(Request::Deposit { envelope }).await {
            Ok(Reply::Deposited { .. }) => taken += 1,
            Ok(other) => {
                return Err(BenchError::Protocol(format!(
                    "unexpected reply to a deposit: {other:?}"
                )));
            }
            Err(BenchError::Refused(_)) => refused += 1,
            Err(error) => return Err(error),
        }
    }
    Ok((taken, refused))
}
