//! Two real runtimes on a discovery server in this process: many concurrent sends to one
//! recipient are pipelined over one link, arrive in the order the sender took them, and
//! are each shown once.

use std::{net::SocketAddr, time::Duration};

use futures::future::join_all;
use peer::{Config, DeliveryStatus, Event, state::Direction};
use proto::Username;
use store::{EmbeddedStore, MailLimits, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn name(text: &str) -> Username {
    Username::new(text).unwrap()
}

async fn discovery(dir: &std::path::Path, shutdown: &CancellationToken) -> SocketAddr {
    let store = EmbeddedStore::open(dir.join("store.redb"), MailLimits::default()).unwrap();
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(discovery::run(
        listener,
        Store::Embedded(store),
        discovery::Config::default(),
        shutdown.clone(),
    ));
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_to_one_recipient_arrive_in_order_each_shown_once() {
    const COUNT: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let server = discovery(dir.path(), &shutdown).await;
    let start = |user: &str| {
        let mut config = Config::new(server.to_string(), name(user), dir.path().join(user));
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        peer::start(config, shutdown.child_token())
    };
    let (alice, _alice_events) = start("alice").await.unwrap();
    let (bob, mut bob_events) = start("bob").await.unwrap();
    alice.wait_online(Duration::from_secs(10)).await.unwrap();
    bob.wait_online(Duration::from_secs(10)).await.unwrap();

    let bodies: Vec<String> = (0..COUNT).map(|i| format!("message {i}")).collect();
    let bob_name = name("bob");
    let reports = join_all(bodies.iter().map(|body| alice.send(&bob_name, body))).await;
    for report in reports {
        assert_eq!(report.unwrap().status, DeliveryStatus::Delivered);
    }

    // The order the sender took them in is its history order.
    let sent: Vec<String> = alice
        .history(&name("bob"), COUNT)
        .await
        .unwrap()
        .into_iter()
        .filter(|line| line.direction == Direction::Outgoing)
        .map(|line| line.body)
        .collect();
    assert_eq!(sent.len(), COUNT);

    let mut shown = Vec::new();
    while shown.len() < COUNT {
        let event = tokio::time::timeout(Duration::from_secs(10), bob_events.recv())
            .await
            .expect("every message is shown")
            .expect("the runtime is running");
        if let Event::Message(message) = event {
            bob.mark_shown([&message]).await.unwrap();
            shown.push(message.body);
        }
    }
    assert_eq!(shown, sent, "shown once each, in the order sent");
    // Nothing more arrives: no message is shown twice.
    let extra = tokio::time::timeout(Duration::from_millis(300), bob_events.recv()).await;
    assert!(
        !matches!(extra, Ok(Some(Event::Message(_)))),
        "a message was shown twice"
    );
    let received = bob.history(&name("alice"), COUNT + 1).await.unwrap();
    assert_eq!(received.len(), COUNT);

    alice.shutdown(Duration::from_secs(5)).await;
    bob.shutdown(Duration::from_secs(5)).await;
    shutdown.cancel();
}
