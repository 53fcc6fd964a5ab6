//! Contact presence and the second-session notice, over real sockets: pushes only between
//! users who watch each other, offline on a closed or timed-out connection, the watch set's
//! bound, and both across two instances sharing one Redis (where a session still open on
//! one instance takes the presence over when the one holding it ends on the other).

use std::{net::SocketAddr, time::Duration};

use discovery::Config;
use proto::{ErrorCode, Push, Reply, Request, Username, msg::MAX_WATCHED};
use store::testing::RedisServer;

use crate::util::*;

/// Registers a client named `user` and has it watch `contacts`.
async fn watching(address: SocketAddr, user: &str, contacts: &[&str]) -> Client {
    let mut client = Client::connect(address, user).await;
    client.register().await.unwrap();
    watch(&mut client, contacts).await;
    client
}

async fn watch(client: &mut Client, contacts: &[&str]) {
    let users: Vec<Username> = contacts.iter().map(|contact| name(contact)).collect();
    let reply = client.request(Request::Watch { users }).await.unwrap();
    assert!(matches!(reply, Reply::Watching { .. }), "{reply:?}");
}

fn is_presence(user: &str, online: bool) -> impl Fn(&Push) -> bool {
    let user = name(user);
    move |push| {
        *push
            == Push::Presence {
                user: user.clone(),
                online,
            }
    }
}

/// The presence pushes `client` has received by the time a request of its comes back
/// (sent after the events under test, so anything they caused is queued before it).
async fn presence_pushes(client: &mut Client) -> Vec<Push> {
    client.request(Request::Heartbeat).await.unwrap();
    client
        .pushes
        .iter()
        .filter(|push| matches!(push, Push::Presence { .. }))
        .cloned()
        .collect()
}

#[tokio::test]
async fn mutual_contacts_hear_each_other_and_one_sided_watchers_and_strangers_hear_nothing() {
    let server = Server::embedded(config()).await;
    let mut alice = watching(server.address, "alice", &["bob", "dave"]).await;
    // Carol watches alice, who does not watch her; mallory watches everyone.
    let mut carol = watching(server.address, "carol", &["alice"]).await;
    let mut mallory = watching(server.address, "mallory", &["alice", "bob", "carol"]).await;
    // Bob watches alice back: each hears the other is online.
    let mut bob = watching(server.address, "bob", &["alice"]).await;
    alice.push(is_presence("bob", true)).await;
    bob.push(is_presence("alice", true)).await;

    // Bob's connection closes: alice hears it, and no one else does.
    drop(bob.connection);
    alice.push(is_presence("bob", false)).await;
    assert_eq!(presence_pushes(&mut carol).await, vec![]);
    assert_eq!(presence_pushes(&mut mallory).await, vec![]);
    assert_eq!(presence_pushes(&mut alice).await, vec![]);

    // Dave, watched by alice, comes online watching no one: alice hears nothing.
    let mut dave = Client::connect(server.address, "dave").await;
    dave.register().await.unwrap();
    watch(&mut dave, &[]).await;
    assert_eq!(presence_pushes(&mut alice).await, vec![]);
    server.stop().await;
}

#[tokio::test]
async fn unwatching_a_contact_ends_mutuality_and_shows_you_offline_to_them() {
    let server = Server::embedded(config()).await;
    let mut alice = watching(server.address, "alice", &["bob"]).await;
    let mut bob = watching(server.address, "bob", &["alice"]).await;
    alice.push(is_presence("bob", true)).await;
    bob.push(is_presence("alice", true)).await;
    // Alice blocks bob: her client stops watching him.
    let reply = alice
        .request(Request::Unwatch {
            users: vec![name("bob")],
        })
        .await
        .unwrap();
    assert_eq!(
        reply,
        Reply::Watching {
            watched: 0,
            room: MAX_WATCHED as u32
        }
    );
    bob.push(is_presence("alice", false)).await;
    // Alice's later changes no longer reach bob.
    drop(alice.connection);
    assert_eq!(presence_pushes(&mut bob).await, vec![]);
    server.stop().await;
}

#[tokio::test]
async fn a_contact_whose_presence_times_out_goes_offline() {
    let server = Server::embedded(Config {
        heartbeat_interval: Duration::from_millis(200),
        presence_ttl: Duration::from_millis(800),
        ..config()
    })
    .await;
    let mut alice = watching(server.address, "alice", &["bob"]).await;
    let mut bob = watching(server.address, "bob", &["alice"]).await;
    alice.push(is_presence("bob", true)).await;
    bob.push(is_presence("alice", true)).await;
    // Bob goes silent with his connection open; alice keeps heartbeating.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        alice.request(Request::Heartbeat).await.unwrap();
        if alice.pushes.contains(&Push::Presence {
            user: name("bob"),
            online: false,
        }) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob's timeout never reached alice"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn the_watch_set_is_bounded() {
    let server = Server::embedded(config()).await;
    let mut alice = watching(server.address, "alice", &[]).await;
    let names: Vec<Username> = (0..MAX_WATCHED)
        .map(|index| name(&format!("u{index}")))
        .collect();
    assert_eq!(
        alice
            .request(Request::Watch {
                users: names.clone()
            })
            .await
            .unwrap(),
        Reply::Watching {
            watched: MAX_WATCHED as u32,
            room: 0
        }
    );
    let refused = alice
        .request(Request::Watch {
            users: vec![name("one-too-many")],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::TooLarge);
    // The connection carries on; a name already watched costs nothing.
    assert!(
        alice
            .request(Request::Watch {
                users: names[..1].to_vec()
            })
            .await
            .is_ok()
    );
    server.stop().await;
}

#[tokio::test]
async fn a_second_session_is_told_to_the_first_if_it_asked() {
    let server = Server::embedded(config()).await;
    let mut alice = watching(server.address, "alice", &[]).await;
    // An older client (no watch request) is never sent the new push.
    let mut old = Client::connect(server.address, "olivia").await;
    old.register().await.unwrap();

    let mut second = second_session(server.address, &alice).await;
    let notice = alice
        .push(|push| matches!(push, Push::SessionElsewhere { .. }))
        .await;
    let Push::SessionElsewhere { observed, .. } = notice else {
        unreachable!()
    };
    assert!(observed.ip().is_loopback(), "{observed}");
    // The new session is not told about itself.
    second.request(Request::Heartbeat).await.unwrap();
    assert!(second.pushes.is_empty(), "{:?}", second.pushes);

    let _olivia_again = second_session(server.address, &old).await;
    old.request(Request::Heartbeat).await.unwrap();
    assert!(old.pushes.is_empty(), "{:?}", old.pushes);
    server.stop().await;
}

#[tokio::test]
async fn presence_and_second_sessions_work_across_two_instances_sharing_one_redis() {
    let redis = RedisServer::start().unwrap();
    let first = Server::redis(&redis).await;
    let second = Server::redis(&redis).await;
    let mut alice = watching(first.address, "alice", &["bob"]).await;
    let mut mallory = watching(second.address, "mallory", &["alice"]).await;
    let mut bob = watching(second.address, "bob", &["alice"]).await;
    alice.push(is_presence("bob", true)).await;
    bob.push(is_presence("alice", true)).await;

    drop(bob.connection);
    alice.push(is_presence("bob", false)).await;
    assert_eq!(presence_pushes(&mut mallory).await, vec![]);

    let _elsewhere = second_session(second.address, &alice).await;
    alice
        .push(|push| matches!(push, Push::SessionElsewhere { .. }))
        .await;
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_session_on_another_instance_takes_over_when_the_one_holding_the_presence_ends() {
    let redis = RedisServer::start().unwrap();
    let first = Server::redis(&redis).await;
    let second = Server::redis(&redis).await;
    let mut alice = watching(first.address, "alice", &["bob"]).await;
    // Bob is connected twice: an older session on the second instance, and a newer one on
    // the first, whose registration took the presence record over.
    let bob_older = watching(second.address, "bob", &["alice"]).await;
    alice.push(is_presence("bob", true)).await;
    let mut bob_newer = second_session(first.address, &bob_older).await;
    watch(&mut bob_newer, &["alice"]).await;

    // The newer one ends and clears the presence: its instance tells alice "offline", and
    // the session still open on the other instance writes the presence again and tells
    // her "online". Lookups see bob online again without any heartbeat of his.
    let Ok(Reply::User(before)) = alice.lookup("bob").await else {
        panic!("bob's lookup failed");
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    drop(bob_newer.connection);
    let mut online = false;
    for _ in 0..100 {
        let Ok(Reply::User(bob)) = alice.lookup("bob").await else {
            panic!("bob's lookup failed");
        };
        // A presence written after the newer session's (its clearing keeps its time).
        if bob.online && bob.last_seen_ms > before.last_seen_ms {
            online = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(online, "bob's older session did not take the presence over");
    // Alice's client ends up showing bob online: the two notices came inside one push
    // interval and cancelled out, or the "online" came after the "offline".
    tokio::time::sleep(Duration::from_millis(
        discovery::presence::MIN_PUSH_INTERVAL_MS + 500,
    ))
    .await;
    let pushes = presence_pushes(&mut alice).await;
    assert!(
        pushes.is_empty()
            || pushes
                == vec![
                    Push::Presence {
                        user: name("bob"),
                        online: false
                    },
                    Push::Presence {
                        user: name("bob"),
                        online: true
                    },
                ],
        "{pushes:?}"
    );
    drop(bob_older);
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn contacts_hear_that_the_users_of_an_instance_that_died_went_offline() {
    let redis = RedisServer::start().unwrap();
    // Short timers, so the dead instance's presence lapses within the test.
    let config = Config {
        heartbeat_interval: Duration::from_millis(500),
        presence_ttl: Duration::from_millis(1_500),
        ..config()
    };
    let live = Server::start(
        store::Store::Redis(
            store::RedisStore::connect(&redis.url(), store::MailLimits::default())
                .await
                .unwrap(),
        ),
        config.clone(),
    )
    .await;
    let doomed = Crashable::start(&redis, config);
    let mut alice = watching(live.address, "alice", &["bob"]).await;
    // Mallory watches bob, who does not watch her back: she must learn nothing.
    let mut mallory = watching(live.address, "mallory", &["bob"]).await;
    let _bob = watching(doomed.address, "bob", &["alice"]).await;
    alice.push(is_presence("bob", true)).await;
    // Bob's entry in the online index is written (the index writer sends its batches a
    // moment later): the list alice asks for names him.
    let mut listed = false;
    for _ in 0..100 {
        if let Ok(Reply::Users(users)) = alice.request(Request::List).await
            && users.contains(&name("bob"))
        {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(listed, "bob never appeared in the list");

    // Bob's instance dies: nobody clears his presence or tells alice. Her instance finds
    // the lapsed presence and tells her, while she and mallory keep heartbeating.
    doomed.crash();
    let mut offline = false;
    for _ in 0..100 {
        let pushes = presence_pushes(&mut alice).await;
        alice.pushes.clear();
        if pushes.contains(&Push::Presence {
            user: name("bob"),
            online: false,
        }) {
            offline = true;
            break;
        }
        assert_eq!(presence_pushes(&mut mallory).await, vec![]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(offline, "alice never heard that bob went offline");
    let Ok(Reply::User(bob)) = alice.lookup("bob").await else {
        panic!("bob's lookup failed");
    };
    assert!(!bob.online, "{bob:?}");
    assert_eq!(presence_pushes(&mut mallory).await, vec![]);
    live.stop().await;
}

#[tokio::test]
async fn a_flapping_contact_is_merged_into_one_push_per_interval_ending_in_the_last_state() {
    let server = Server::embedded(config()).await;
    let mut alice = watching(server.address, "alice", &["bob"]).await;
    let bob = watching(server.address, "bob", &["alice"]).await;
    alice.push(is_presence("bob", true)).await;
    // Bob drops and comes back three times within the interval, then drops for good.
    let mut gone = bob.disconnect(&mut alice).await;
    for _ in 0..3 {
        let mut again = gone.reconnect(server.address).await;
        again.register().await.unwrap();
        watch(&mut again, &["alice"]).await;
        gone = again.disconnect(&mut alice).await;
    }
    // One push, when the interval ends: offline, the last state.
    alice.push(is_presence("bob", false)).await;
    assert_eq!(presence_pushes(&mut alice).await, vec![]);
    server.stop().await;
}
