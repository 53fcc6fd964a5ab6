//! The state machine, request by request and error code by error code, over an embedded
//! store in a temporary folder, with time passed in.

use std::time::Duration;

use proto::{Channel, Identity, MessageId, identity::announce_proof};
use store::{EmbeddedStore, MailLimits};

use super::*;

const T0: u64 = 1_790_000_000_000;
const SECRET: &[u8] = b"operator secret for tests";

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    store: Store,
    config: Config,
    metrics: Metrics,
}

impl Fixture {
    fn new() -> Self {
        Self::with_limits(MailLimits::default())
    }

    fn with_limits(limits: MailLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = Store::Embedded(EmbeddedStore::open(&path, limits).unwrap());
        Self {
            _dir: dir,
            path,
            store,
            config: Config {
                operator_secret: Some(SECRET.to_vec()),
                ..Config::default()
            },
            metrics: Metrics::default(),
        }
    }

    /// The same data opened by a new store, as after a server restart.
    fn restart(&mut self) {
        // Drop the old handle first (by replacing it with a scratch store): redb allows one
        // open database per file.
        let scratch = self._dir.path().join("scratch.redb");
        self.store = Store::Embedded(EmbeddedStore::open(scratch, MailLimits::default()).unwrap());
        self.store =
            Store::Embedded(EmbeddedStore::open(&self.path, MailLimits::default()).unwrap());
    }

    async fn handle(
        &self,
        session: &mut Session,
        request: Request,
        now: u64,
    ) -> Result<Reply, ErrorReply> {
        session
            .handle(request, &self.store, &self.config, &self.metrics, now)
            .await
            .0
    }
}

struct Client {
    name: Username,
    identity: Identity,
    session: Session,
}

fn name(text: &str) -> Username {
    Username::new(text).unwrap()
}

fn session() -> Session {
    Session::new(
        proto::random_bytes(),
        rand_id(),
        "127.0.0.9:40000".parse().unwrap(),
    )
}

fn rand_id() -> u64 {
    u64::from_le_bytes(proto::random_bytes())
}

fn registration(
    session: &Session,
    user: &Username,
    identity: &Identity,
    ports: Vec<u16>,
) -> Request {
    let transcript =
        registration_transcript(&session.nonce, &session.channel, user, identity.public());
    Request::Register(Registration {
        user: user.clone(),
        keys: identity.public().clone(),
        listen_ports: ports,
        signature: identity.sign(&transcript),
    })
}

async fn registered(fixture: &Fixture, user: &str, now: u64) -> Client {
    let identity = Identity::generate();
    let mut session = session();
    let user = name(user);
    let request = registration(&session, &user, &identity, vec![4000]);
    let reply = fixture.handle(&mut session, request, now).await.unwrap();
    assert!(matches!(reply, Reply::Registered { .. }));
    Client {
        name: user,
        identity,
        session,
    }
}

fn sealed(from: &Client, to: &Client, body: &str) -> proto::Envelope {
    Channel::new(&from.identity, &from.name, &to.name, to.identity.public())
        .unwrap()
        .seal(MessageId::random(), body, T0)
        .unwrap()
}

fn code(result: Result<Reply, ErrorReply>) -> ErrorCode {
    result.expect_err("expected an error").code
}

#[tokio::test]
async fn first_registration_binds_and_reports_the_observed_address() {
    let fixture = Fixture::new();
    let identity = Identity::generate();
    let mut session = session();
    let request = registration(&session, &name("alice"), &identity, vec![4000, 4001]);
    let (result, event) = session
        .handle(
            request,
            &fixture.store,
            &fixture.config,
            &fixture.metrics,
            T0,
        )
        .await;
    assert_eq!(
        result.unwrap(),
        Reply::Registered {
            observed: "127.0.0.9:40000".parse().unwrap(),
            new_binding: true,
            heartbeat_interval_ms: 10_000,
            presence_ttl_ms: 30_000,
        }
    );
    assert_eq!(event, Some(Event::Registered(name("alice"))));
    assert_eq!(session.user(), Some(&name("alice")));
    assert_eq!(fixture.metrics.registrations.get(), 1);
}

/// Regression: the declared listening ports were kept as given, so one registration of
/// ~60,000 ports (one frame) made the server hold an address for each, in the presence
/// record, long after the user went offline. Now at most a few real ports, each once.
#[tokio::test]
async fn listening_ports_are_bounded_real_and_kept_once() {
    let fixture = Fixture::new();
    let identity = Identity::generate();
    let alice = name("alice");
    for ports in [vec![1u16; 60_000], vec![4000, 0], (1..=9).collect()] {
        let mut session = session();
        let request = registration(&session, &alice, &identity, ports);
        assert_eq!(
            code(fixture.handle(&mut session, request, T0).await),
            ErrorCode::BadRequest
        );
    }
    assert_eq!(fixture.store.presence(&alice).await.unwrap(), None);
    let mut session = session();
    let request = registration(&session, &alice, &identity, vec![4000, 4001, 4000]);
    fixture.handle(&mut session, request, T0).await.unwrap();
    let presence = fixture.store.presence(&alice).await.unwrap().unwrap();
    let ports: Vec<u16> = presence.addresses.iter().map(|a| a.port()).collect();
    assert_eq!(ports, vec![4000, 4001]);
}

#[tokio::test]
async fn re_registration_after_a_server_restart_proves_the_bound_key() {
    let mut fixture = Fixture::new();
    let alice = registered(&fixture, "alice", T0).await;
    fixture.restart();
    let mut fresh = session();
    let request = registration(&fresh, &alice.name, &alice.identity, vec![4000]);
    match fixture
        .handle(&mut fresh, request, T0 + 1000)
        .await
        .unwrap()
    {
        Reply::Registered { new_binding, .. } => assert!(!new_binding),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_bound_name_with_another_key_is_taken() {
    let fixture = Fixture::new();
    let _alice = registered(&fixture, "alice", T0).await;
    let impostor = Identity::generate();
    let mut session = session();
    let request = registration(&session, &name("alice"), &impostor, vec![4000]);
    let error = fixture.handle(&mut session, request, T0).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::NameTaken);
    assert!(error.message.contains("alice"));
    assert_eq!(session.user(), None);
    assert_eq!(fixture.metrics.errors(ErrorCode::NameTaken), 1);
}

#[tokio::test]
async fn a_replayed_registration_signature_is_refused() {
    let fixture = Fixture::new();
    let alice = registered(&fixture, "alice", T0).await;
    // The recorded request was signed over the first session's nonce.
    let recorded = registration(&alice.session, &alice.name, &alice.identity, vec![4000]);
    let mut attacker = session();
    assert_eq!(
        code(fixture.handle(&mut attacker, recorded, T0).await),
        ErrorCode::BadSignature
    );
}

#[tokio::test]
async fn an_unsigned_exchange_key_is_refused() {
    let fixture = Fixture::new();
    let identity = Identity::generate();
    let mut session = session();
    let mut keys = identity.public().clone();
    keys.exchange = Identity::generate().public().exchange;
    let transcript =
        registration_transcript(&session.nonce, &session.channel, &name("mallory"), &keys);
    let request = Request::Register(Registration {
        user: name("mallory"),
        keys,
        listen_ports: vec![],
        signature: identity.sign(&transcript),
    });
    assert_eq!(
        code(fixture.handle(&mut session, request, T0).await),
        ErrorCode::BadSignature
    );
}

#[tokio::test]
async fn registering_another_name_on_the_same_connection_is_a_bad_request() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let other = Identity::generate();
    let request = registration(&alice.session, &name("bob"), &other, vec![]);
    assert_eq!(
        code(fixture.handle(&mut alice.session, request, T0).await),
        ErrorCode::BadRequest
    );
}

#[tokio::test]
async fn every_request_but_register_and_announce_needs_a_registration() {
    let fixture = Fixture::new();
    let mut session = session();
    let requests = [
        Request::Heartbeat,
        Request::Lookup { user: name("bob") },
        Request::List,
        Request::Fetch { max: 10 },
        Request::Ack { ids: vec![] },
        Request::Block { user: name("bob") },
        Request::Unblock { user: name("bob") },
        Request::Unregister,
        Request::Deposit {
            envelope: proto::Envelope {
                id: MessageId::random(),
                from: name("x"),
                to: name("y"),
                token: Vec::new(),
            },
        },
    ];
    for request in requests {
        assert_eq!(
            code(fixture.handle(&mut session, request, T0).await),
            ErrorCode::NotRegistered
        );
    }
}

#[tokio::test]
async fn lookup_and_list_follow_presence_and_its_ttl() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let _bob = registered(&fixture, "bob", T0).await;

    let lookup = Request::Lookup { user: name("bob") };
    match fixture
        .handle(&mut alice.session, lookup.clone(), T0 + 29_000)
        .await
        .unwrap()
    {
        Reply::User(info) => {
            assert!(info.online);
            assert_eq!(info.addresses, vec!["127.0.0.9:4000".parse().unwrap()]);
            assert_eq!(info.last_seen_ms, Some(T0));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        fixture
            .handle(&mut alice.session, Request::List, T0 + 29_000)
            .await
            .unwrap(),
        Reply::Users(vec![name("alice"), name("bob")])
    );
    // Alice heartbeats, Bob does not: past the 30 s TTL only Alice is online.
    assert_eq!(
        fixture
            .handle(&mut alice.session, Request::Heartbeat, T0 + 20_000)
            .await
            .unwrap(),
        Reply::Pong
    );
    match fixture
        .handle(&mut alice.session, lookup, T0 + 31_000)
        .await
        .unwrap()
    {
        Reply::User(info) => {
            assert!(!info.online);
            assert!(info.addresses.is_empty());
            assert_eq!(info.last_seen_ms, Some(T0));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        fixture
            .handle(&mut alice.session, Request::List, T0 + 31_000)
            .await
            .unwrap(),
        Reply::Users(vec![name("alice")])
    );
    assert_eq!(
        code(
            fixture
                .handle(
                    &mut alice.session,
                    Request::Lookup {
                        user: name("nobody")
                    },
                    T0
                )
                .await
        ),
        ErrorCode::UnknownUser
    );
    assert_eq!(fixture.metrics.lookups.get(), 3);
}

#[tokio::test]
async fn an_empty_list_is_a_normal_reply() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    assert_eq!(
        fixture
            .handle(&mut alice.session, Request::List, T0 + 60_000)
            .await
            .unwrap(),
        Reply::Users(vec![])
    );
}

#[tokio::test]
async fn unregister_goes_offline_at_once_and_needs_registration_again() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let mut bob = registered(&fixture, "bob", T0).await;
    let (result, event) = alice
        .session
        .handle(
            Request::Unregister,
            &fixture.store,
            &fixture.config,
            &fixture.metrics,
            T0 + 1,
        )
        .await;
    assert_eq!(result.unwrap(), Reply::Done);
    assert_eq!(event, Some(Event::Unregistered(name("alice"))));
    assert_eq!(
        fixture
            .handle(&mut bob.session, Request::List, T0 + 2)
            .await
            .unwrap(),
        Reply::Users(vec![name("bob")])
    );
    assert_eq!(
        code(
            fixture
                .handle(&mut alice.session, Request::Heartbeat, T0 + 3)
                .await
        ),
        ErrorCode::NotRegistered
    );
}

#[tokio::test]
async fn mail_is_deposited_fetched_and_deleted_only_on_ack() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let mut bob = registered(&fixture, "bob", T0).await;
    let mut events = fixture.store.subscribe();
    let envelope = sealed(&alice, &bob, "hello bob");
    let deposit = Request::Deposit {
        envelope: envelope.clone(),
    };
    assert_eq!(
        fixture
            .handle(&mut alice.session, deposit.clone(), T0)
            .await
            .unwrap(),
        Reply::Deposited {
            recipient_online: true
        }
    );
    assert_eq!(
        events.recv().await.unwrap(),
        Broadcast::MailWaiting { user: name("bob") }
    );
    // A retried deposit is not stored twice.
    fixture
        .handle(&mut alice.session, deposit, T0)
        .await
        .unwrap();
    assert_eq!(fixture.metrics.mail_deposited.get(), 1);

    for _ in 0..2 {
        assert_eq!(
            fixture
                .handle(&mut bob.session, Request::Fetch { max: 10 }, T0)
                .await
                .unwrap(),
            Reply::Mail {
                envelopes: vec![envelope.clone()],
                remaining: 0
            }
        );
    }
    assert_eq!(
        fixture
            .handle(
                &mut bob.session,
                Request::Ack {
                    ids: vec![envelope.id]
                },
                T0
            )
            .await
            .unwrap(),
        Reply::Acked { removed: 1 }
    );
    assert_eq!(
        fixture
            .handle(&mut bob.session, Request::Fetch { max: 10 }, T0)
            .await
            .unwrap(),
        Reply::Mail {
            envelopes: vec![],
            remaining: 0
        }
    );
    assert_eq!(fixture.metrics.mail_delivered.get(), 1);
}

#[tokio::test]
async fn deposit_errors_each_have_their_code() {
    let fixture = Fixture::with_limits(MailLimits {
        cap: 1,
        ..MailLimits::default()
    });
    let mut alice = registered(&fixture, "alice", T0).await;
    let mut bob = registered(&fixture, "bob", T0).await;
    let carol = registered(&fixture, "carol", T0).await;

    // Sending as someone else.
    let forged = sealed(&carol, &bob, "I am carol");
    assert_eq!(
        code(
            fixture
                .handle(
                    &mut alice.session,
                    Request::Deposit { envelope: forged },
                    T0
                )
                .await
        ),
        ErrorCode::BadRequest
    );
    // An unknown recipient.
    let mut nowhere = sealed(&alice, &bob, "x");
    nowhere.to = name("nobody");
    assert_eq!(
        code(
            fixture
                .handle(
                    &mut alice.session,
                    Request::Deposit { envelope: nowhere },
                    T0
                )
                .await
        ),
        ErrorCode::UnknownUser
    );
    // Too large.
    let mut huge = sealed(&alice, &bob, "x");
    huge.token = vec![0xA5; MAX_TOKEN_LEN + 1];
    assert_eq!(
        code(
            fixture
                .handle(&mut alice.session, Request::Deposit { envelope: huge }, T0)
                .await
        ),
        ErrorCode::TooLarge
    );
    // Blocked, then unblocked.
    assert_eq!(
        fixture
            .handle(
                &mut bob.session,
                Request::Block {
                    user: name("alice")
                },
                T0
            )
            .await
            .unwrap(),
        Reply::Done
    );
    let first = Request::Deposit {
        envelope: sealed(&alice, &bob, "one"),
    };
    assert_eq!(
        code(fixture.handle(&mut alice.session, first.clone(), T0).await),
        ErrorCode::Blocked
    );
    fixture
        .handle(
            &mut bob.session,
            Request::Unblock {
                user: name("alice"),
            },
            T0,
        )
        .await
        .unwrap();
    fixture.handle(&mut alice.session, first, T0).await.unwrap();
    // Full (the cap is one message).
    let second = Request::Deposit {
        envelope: sealed(&alice, &bob, "two"),
    };
    let error = fixture
        .handle(&mut alice.session, second, T0)
        .await
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::MailboxFull);
    assert!(error.message.contains("bob"));
}

#[tokio::test]
async fn block_rules() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    assert_eq!(
        code(
            fixture
                .handle(
                    &mut alice.session,
                    Request::Block {
                        user: name("alice")
                    },
                    T0
                )
                .await
        ),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(
            fixture
                .handle(
                    &mut alice.session,
                    Request::Block {
                        user: name("ghost")
                    },
                    T0
                )
                .await
        ),
        ErrorCode::UnknownUser
    );
    assert_eq!(
        code(
            fixture
                .handle(
                    &mut alice.session,
                    Request::Unblock {
                        user: name("ghost")
                    },
                    T0
                )
                .await
        ),
        ErrorCode::UnknownUser
    );
}

#[tokio::test]
async fn a_fetch_reply_fits_in_one_frame() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let mut bob = registered(&fixture, "bob", T0).await;
    let body = "y".repeat(proto::seal::MAX_BODY_LEN);
    for _ in 0..10 {
        let request = Request::Deposit {
            envelope: sealed(&alice, &bob, &body),
        };
        fixture
            .handle(&mut alice.session, request, T0)
            .await
            .unwrap();
    }
    match fixture
        .handle(&mut bob.session, Request::Fetch { max: 100 }, T0)
        .await
        .unwrap()
    {
        reply @ Reply::Mail { .. } => {
            let Reply::Mail {
                envelopes,
                remaining,
            } = &reply
            else {
                unreachable!()
            };
            assert!(!envelopes.is_empty() && envelopes.len() < 10);
            assert_eq!(envelopes.len() as u64 + remaining, 10);
            let frame = proto::ServerMsg::Response {
                id: 1,
                result: Ok(reply.clone()),
            };
            assert!(proto::wire::encode(&frame).unwrap().len() <= proto::wire::MAX_FRAME_LEN);
        }
        other => panic!("{other:?}"),
    }
}

/// The store now stops reading at the frame's budget instead of the handler trimming a
/// batch of up to `fetch_batch`: small messages must still fill the frame (the mailbox
/// drain depends on it), with `remaining` counting the rest.
#[tokio::test]
async fn a_fetch_reply_of_small_messages_fills_the_frame() {
    let fixture = Fixture::new();
    let alice = registered(&fixture, "alice", T0).await;
    let mut bob = registered(&fixture, "bob", T0).await;
    let sent: Vec<_> = (0..400).map(|_| sealed(&alice, &bob, "hi")).collect();
    // Straight into the store, all at once: the deposit writer commits them in groups.
    futures::future::try_join_all(
        sent.iter()
            .map(|envelope| fixture.store.deposit(envelope, T0)),
    )
    .await
    .unwrap();
    let size = proto::wire::encoded_len(&sent[0]).unwrap();
    let fit = FETCH_REPLY_BUDGET / size;
    assert!(
        fit < sent.len(),
        "the test needs more mail than one frame holds"
    );
    match fixture
        .handle(&mut bob.session, Request::Fetch { max: 1_000 }, T0)
        .await
        .unwrap()
    {
        Reply::Mail {
            envelopes,
            remaining,
        } => {
            assert_eq!(envelopes.len(), fit, "{size}-byte envelopes");
            assert_eq!(remaining, (sent.len() - fit) as u64);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn expired_mail_is_not_fetched() {
    let fixture = Fixture::with_limits(MailLimits {
        ttl_ms: Duration::from_secs(3600).as_millis() as u64,
        ..MailLimits::default()
    });
    let mut alice = registered(&fixture, "alice", T0).await;
    let mut bob = registered(&fixture, "bob", T0).await;
    let request = Request::Deposit {
        envelope: sealed(&alice, &bob, "soon gone"),
    };
    fixture
        .handle(&mut alice.session, request, T0)
        .await
        .unwrap();
    assert_eq!(
        fixture
            .handle(&mut bob.session, Request::Fetch { max: 10 }, T0 + 3_600_001)
            .await
            .unwrap(),
        Reply::Mail {
            envelopes: vec![],
            remaining: 0
        }
    );
}

#[tokio::test]
async fn only_the_operator_can_announce() {
    let fixture = Fixture::new();
    let mut events = fixture.store.subscribe();
    let mut operator = session();
    let good = announce_proof(SECRET, &operator.nonce, "maintenance at noon");
    assert_eq!(
        fixture
            .handle(
                &mut operator,
                Request::Announce {
                    text: "maintenance at noon".into(),
                    proof: good
                },
                T0
            )
            .await
            .unwrap(),
        Reply::Done
    );
    assert_eq!(
        events.recv().await.unwrap(),
        Broadcast::Announcement {
            text: "maintenance at noon".into()
        }
    );

    let forged = announce_proof(b"guess", &operator.nonce, "free pizza");
    assert_eq!(
        code(
            fixture
                .handle(
                    &mut operator,
                    Request::Announce {
                        text: "free pizza".into(),
                        proof: forged
                    },
                    T0
                )
                .await
        ),
        ErrorCode::Unauthorized
    );
    let empty = announce_proof(SECRET, &operator.nonce, "  ");
    assert_eq!(
        code(
            fixture
                .handle(
                    &mut operator,
                    Request::Announce {
                        text: "  ".into(),
                        proof: empty
                    },
                    T0
                )
                .await
        ),
        ErrorCode::BadRequest
    );
    let long = "x".repeat(proto::seal::MAX_BODY_LEN + 1);
    let proof = announce_proof(SECRET, &operator.nonce, &long);
    assert_eq!(
        code(
            fixture
                .handle(&mut operator, Request::Announce { text: long, proof }, T0)
                .await
        ),
        ErrorCode::TooLarge
    );
    let mut no_secret = Fixture::new();
    no_secret.config.operator_secret = None;
    let proof = announce_proof(SECRET, &operator.nonce, "x");
    assert_eq!(
        code(
            no_secret
                .handle(
                    &mut operator,
                    Request::Announce {
                        text: "x".into(),
                        proof
                    },
                    T0
                )
                .await
        ),
        ErrorCode::Unauthorized
    );
}

#[test]
fn store_failures_map_to_codes() {
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "down");
    assert_eq!(
        store_error(StoreError::Redis(io.into())).code,
        ErrorCode::Unavailable
    );
    assert_eq!(
        store_error(StoreError::Embedded("disk".into())).code,
        ErrorCode::Internal
    );
    let full = store_error(StoreError::StorageFull("no space".into()));
    assert_eq!(full.code, ErrorCode::Unavailable);
    assert!(full.message.contains("storage is full"), "{full}");
    assert_eq!(
        store_error(StoreError::MailboxFull {
            user: name("a"),
            cap: 3
        })
        .code,
        ErrorCode::MailboxFull
    );
    assert_eq!(
        store_error(StoreError::Blocked {
            recipient: name("a"),
            sender: name("b")
        })
        .code,
        ErrorCode::Blocked
    );
}

/// Regression: `List` returned every online user, and failed for everyone with `too_large`
/// once some thousands were online. Past the limit it lists the first names and counts the
/// rest; at the limit it is the whole list, as before.
#[tokio::test]
async fn list_past_its_limit_gives_the_first_names_and_a_count_of_the_rest() {
    let mut fixture = Fixture::new();
    fixture.config.list_max = 2;
    let mut carol = registered(&fixture, "carol", T0).await;
    let _alice = registered(&fixture, "alice", T0).await;
    assert_eq!(
        fixture
            .handle(&mut carol.session, Request::List, T0)
            .await
            .unwrap(),
        Reply::Users(vec![name("alice"), name("carol")])
    );
    let _bob = registered(&fixture, "bob", T0).await;
    assert_eq!(
        fixture
            .handle(&mut carol.session, Request::List, T0)
            .await
            .unwrap(),
        Reply::UsersCapped {
            users: vec![name("alice"), name("bob")],
            more: 1
        }
    );
    assert_eq!(fixture.metrics.lists_capped.get(), 1);
}

/// Past its hourly budget of new names, an address is refused a new name with
/// `rate_limited`, while a name already bound re-registers and another address binds freely;
/// an hour later the address binds again.
#[tokio::test]
async fn new_names_from_one_address_are_limited_per_hour() {
    use crate::per_ip::{PerIp, PerIpLimits};
    let fixture = Fixture::new();
    let per_ip = PerIp::new(PerIpLimits {
        connections: 10,
        requests_per_second: 1000,
        request_burst: 1000,
        new_names_per_hour: 2,
    });
    let office: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    let elsewhere: SocketAddr = "10.0.0.2:40000".parse().unwrap();
    // The server holds a slot per connection; so does this test.
    let _connections = [
        per_ip.connect(office.ip(), std::time::Instant::now(), T0),
        per_ip.connect(elsewhere.ip(), std::time::Instant::now(), T0),
    ];
    let limited_session = |observed: SocketAddr| {
        Session::new(proto::random_bytes(), rand_id(), observed).limited_by(Arc::clone(&per_ip))
    };
    let register = |observed: SocketAddr, user: &str, identity: &Identity, now: u64| {
        let mut session = limited_session(observed);
        let request = registration(&session, &name(user), identity, vec![4000]);
        let fixture = &fixture;
        async move { fixture.handle(&mut session, request, now).await }
    };
    let alice = Identity::generate();
    register(office, "alice", &alice, T0).await.unwrap();
    register(office, "bob", &Identity::generate(), T0)
        .await
        .unwrap();
    let refused = register(office, "carol", &Identity::generate(), T0 + 1)
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::RateLimited);
    assert!(
        refused.message.contains("new names from your address"),
        "{refused}"
    );
    assert_eq!(fixture.metrics.per_ip_names_refused.get(), 1);
    // A name already bound re-registers past the budget (and is not taken by another key).
    register(office, "alice", &alice, T0 + 2).await.unwrap();
    assert_eq!(
        register(office, "alice", &Identity::generate(), T0 + 2)
            .await
            .unwrap_err()
            .code,
        ErrorCode::NameTaken
    );
    // Another address has its own budget.
    register(elsewhere, "dave", &Identity::generate(), T0 + 3)
        .await
        .unwrap();
    // An hour after the first new name, the office binds again.
    register(office, "carol", &Identity::generate(), T0 + 60 * 60 * 1000)
        .await
        .unwrap();
}

/// Seals `body` from `from` to `to` under the message id `id`.
fn sealed_with_id(from: &Client, to: &Client, id: MessageId, body: &str) -> proto::Envelope {
    Channel::new(&from.identity, &from.name, &to.name, to.identity.public())
        .unwrap()
        .seal(id, body, T0)
        .unwrap()
}

/// Regression (issue 12): a second sender's deposit reusing another sender's message id
/// was answered `Deposited` and silently dropped. Mail identity is (sender, id): both are
/// stored and fetched, a sender's retransmission is still stored once, and an ack by
/// (sender, id) takes only that sender's message; the older ack by id alone takes the
/// messages of the last fetch with that id.
#[tokio::test]
async fn a_second_sender_reusing_an_id_is_stored_and_acks_name_the_sender() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let mut mallory = registered(&fixture, "mallory", T0).await;
    let mut bob = registered(&fixture, "bob", T0).await;
    let id = MessageId::random();
    let from_alice = sealed_with_id(&alice, &bob, id, "hello bob");
    let from_mallory = sealed_with_id(&mallory, &bob, id, "same id");
    for (sender, envelope) in [(&mut alice, &from_alice), (&mut mallory, &from_mallory)] {
        // Each deposited twice: the retransmission is stored once.
        for _ in 0..2 {
            let deposit = Request::Deposit {
                envelope: envelope.clone(),
            };
            let reply = fixture.handle(&mut sender.session, deposit, T0).await;
            assert!(matches!(reply, Ok(Reply::Deposited { .. })), "{reply:?}");
        }
    }
    assert_eq!(
        fixture.metrics.mail_deposited.get(),
        2,
        "both senders' mail, once each"
    );
    let fetch = Request::Fetch { max: 10 };
    assert_eq!(
        fixture.handle(&mut bob.session, fetch.clone(), T0).await,
        Ok(Reply::Mail {
            envelopes: vec![from_alice.clone(), from_mallory.clone()],
            remaining: 0
        })
    );
    let ack_mallory = Request::AckMail {
        mail: vec![MailRef::of(&from_mallory)],
    };
    assert_eq!(
        fixture.handle(&mut bob.session, ack_mallory, T0).await,
        Ok(Reply::Acked { removed: 1 })
    );
    assert_eq!(
        fixture.handle(&mut bob.session, fetch.clone(), T0).await,
        Ok(Reply::Mail {
            envelopes: vec![from_alice.clone()],
            remaining: 0
        })
    );
    // The older form: an id alone names what the last fetch sent with that id.
    let legacy_ack = Request::Ack { ids: vec![id] };
    assert_eq!(
        fixture
            .handle(&mut bob.session, legacy_ack.clone(), T0)
            .await,
        Ok(Reply::Acked { removed: 1 })
    );
    assert_eq!(
        fixture.handle(&mut bob.session, fetch, T0).await,
        Ok(Reply::Mail {
            envelopes: vec![],
            remaining: 0
        })
    );
    assert_eq!(
        fixture.handle(&mut bob.session, legacy_ack, T0).await,
        Ok(Reply::Acked { removed: 0 })
    );
}

/// Issue 12: a mailbox holds at most its byte cap of mail; a deposit past it is
/// `mailbox_full` in words, counted in its own metric, and an ack makes room again.
#[tokio::test]
async fn a_mailbox_past_its_byte_cap_is_full_until_mail_is_acked() {
    let fixture = Fixture::with_limits(MailLimits {
        max_bytes: 40 * 1024,
        ..MailLimits::default()
    });
    let mut alice = registered(&fixture, "alice", T0).await;
    let mut bob = registered(&fixture, "bob", T0).await;
    let body = "x".repeat(10 * 1024);
    let mut refused = None;
    for _ in 0..10 {
        let envelope = sealed(&alice, &bob, &body);
        let deposit = Request::Deposit {
            envelope: envelope.clone(),
        };
        match fixture.handle(&mut alice.session, deposit, T0).await {
            Ok(Reply::Deposited { .. }) => {}
            Err(error) => {
                refused = Some((envelope, error));
                break;
            }
            Ok(other) => panic!("unexpected reply {other:?}"),
        }
    }
    let (envelope, error) = refused.expect("the byte cap refuses within ten messages");
    assert_eq!(error.code, ErrorCode::MailboxFull);
    assert!(
        error
            .message
            .contains("bob's mailbox is full (40 KiB of mail)"),
        "{}",
        error.message
    );
    assert_eq!(fixture.metrics.mailbox_bytes_full.get(), 1);
    assert_eq!(fixture.metrics.errors(ErrorCode::MailboxFull), 1);
    assert!(
        fixture
            .metrics
            .render()
            .contains("p2pchat_mailbox_bytes_full_total 1")
    );

    let Ok(Reply::Mail { envelopes, .. }) = fixture
        .handle(&mut bob.session, Request::Fetch { max: 1 }, T0)
        .await
    else {
        panic!("fetch failed");
    };
    let ack = Request::AckMail {
        mail: envelopes.iter().map(MailRef::of).collect(),
    };
    assert_eq!(
        fixture.handle(&mut bob.session, ack, T0).await,
        Ok(Reply::Acked { removed: 1 })
    );
    let retry = Request::Deposit { envelope };
    assert!(matches!(
        fixture.handle(&mut alice.session, retry, T0).await,
        Ok(Reply::Deposited { .. })
    ));
}

#[tokio::test]
async fn published_prekeys_are_claimed_once_each_and_only_their_owner_publishes() {
    use proto::ratchet::{ONE_TIME_KEYS_TARGET, OwnAccount};
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let mut bob = registered(&fixture, "bob", T0).await;
    let claim = Request::ClaimPreKey { user: name("bob") };
    assert_eq!(
        code(fixture.handle(&mut alice.session, claim.clone(), T0).await),
        ErrorCode::NoPreKeys
    );
    assert_eq!(
        code(
            fixture
                .handle(
                    &mut alice.session,
                    Request::ClaimPreKey {
                        user: name("nobody")
                    },
                    T0
                )
                .await
        ),
        ErrorCode::UnknownUser
    );
    let mut account = OwnAccount::generate(&bob.identity, &bob.name);
    let prekeys = account.prekeys_to_publish(&bob.identity, 0);
    // Alice cannot publish keys as herself that bob's identity signed.
    assert_eq!(
        code(
            fixture
                .handle(
                    &mut alice.session,
                    Request::PublishPreKeys(prekeys.clone()),
                    T0
                )
                .await
        ),
        ErrorCode::BadSignature
    );
    assert_eq!(
        fixture
            .handle(
                &mut bob.session,
                Request::PublishPreKeys(prekeys.clone()),
                T0
            )
            .await
            .unwrap(),
        Reply::PreKeyCount {
            one_time: ONE_TIME_KEYS_TARGET as u32
        }
    );
    match fixture.handle(&mut alice.session, claim, T0).await.unwrap() {
        Reply::PreKey(bundle) => {
            bundle.verify(&bob.name, bob.identity.public()).unwrap();
            assert!(prekeys.one_time.contains(&bundle.prekey));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        fixture
            .handle(
                &mut bob.session,
                Request::PublishPreKeys(proto::ratchet::PreKeys {
                    one_time: Vec::new(),
                    ..prekeys
                }),
                T0
            )
            .await
            .unwrap(),
        Reply::PreKeyCount {
            one_time: ONE_TIME_KEYS_TARGET as u32 - 1
        }
    );
}

#[tokio::test]
async fn name_taken_says_what_the_user_can_do() {
    let fixture = Fixture::new();
    let _alice = registered(&fixture, "alice", T0).await;
    let mut session = session();
    let request = registration(&session, &name("alice"), &Identity::generate(), vec![4000]);
    let error = fixture.handle(&mut session, request, T0).await.unwrap_err();
    for hint in [
        "p2pchat identity import",
        "p2pchat-discovery release-name alice",
        "another name",
    ] {
        assert!(error.message.contains(hint), "{hint}: {}", error.message);
    }
}

#[tokio::test]
async fn a_rotation_signed_by_the_bound_key_moves_the_name_and_is_kept() {
    let mut fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let next = Identity::generate();
    let rotation = Rotation::sign(&alice.name, &alice.identity, &next, T0 + 1);
    let rotate = Request::Rotate(rotation.clone());
    assert_eq!(
        fixture
            .handle(&mut alice.session, rotate.clone(), T0 + 1)
            .await,
        Ok(Reply::Done)
    );
    // Asked again (the answer was lost): done, nothing changes.
    assert_eq!(
        fixture.handle(&mut alice.session, rotate, T0 + 2).await,
        Ok(Reply::Done)
    );
    let mut bob = registered(&fixture, "bob", T0).await;
    let lookup = Request::Lookup {
        user: alice.name.clone(),
    };
    match fixture.handle(&mut bob.session, lookup, T0 + 3).await {
        Ok(Reply::User(info)) => assert_eq!(&info.keys, next.public()),
        other => panic!("{other:?}"),
    }
    let statements = Request::Rotations {
        user: alice.name.clone(),
    };
    assert_eq!(
        fixture
            .handle(&mut bob.session, statements.clone(), T0 + 3)
            .await,
        Ok(Reply::Rotations(vec![rotation]))
    );
    // Only the new key registers now, also after a restart; the old one is taken.
    fixture.restart();
    let mut fresh = session();
    let request = registration(&fresh, &alice.name, &next, vec![4000]);
    assert!(matches!(
        fixture.handle(&mut fresh, request, T0 + 4).await,
        Ok(Reply::Registered {
            new_binding: false,
            ..
        })
    ));
    let mut old = session();
    let request = registration(&old, &alice.name, &alice.identity, vec![4000]);
    assert_eq!(
        code(fixture.handle(&mut old, request, T0 + 4).await),
        ErrorCode::NameTaken
    );
    assert!(matches!(
        fixture.handle(&mut bob.session, statements, T0 + 4).await,
        Ok(Reply::Rotations(kept)) if kept.len() == 1
    ));
}

#[tokio::test]
async fn a_rotation_not_from_the_bound_key_or_for_another_name_is_refused() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let bob = registered(&fixture, "bob", T0).await;
    let next = Identity::generate();
    // Signed by keys that are not bound to the name.
    let stranger = Identity::generate();
    let request = Request::Rotate(Rotation::sign(&alice.name, &stranger, &next, T0));
    assert_eq!(
        code(fixture.handle(&mut alice.session, request, T0).await),
        ErrorCode::BadSignature
    );
    // The old key's signature over other keys than those offered.
    let mut forged = Rotation::sign(&alice.name, &alice.identity, &next, T0);
    forged.new = stranger.public().clone();
    // Someone else's name, even with that name's own signed statement.
    let theirs = Rotation::sign(&bob.name, &bob.identity, &next, T0);
    for (rotation, refused) in [
        (forged, ErrorCode::BadSignature),
        (theirs, ErrorCode::BadRequest),
    ] {
        let request = Request::Rotate(rotation);
        assert_eq!(
            code(fixture.handle(&mut alice.session, request, T0).await),
            refused
        );
    }
    // Not registered: nothing.
    let mut anonymous = session();
    let request = Request::Rotate(Rotation::sign(&alice.name, &alice.identity, &next, T0));
    assert_eq!(
        code(fixture.handle(&mut anonymous, request, T0).await),
        ErrorCode::NotRegistered
    );
    assert_eq!(
        fixture
            .store
            .binding(&alice.name)
            .await
            .unwrap()
            .unwrap()
            .keys,
        *alice.identity.public()
    );
}

#[tokio::test]
async fn the_operator_releases_a_name_and_the_next_registration_binds_it() {
    let fixture = Fixture::new();
    let alice = registered(&fixture, "alice", T0).await;
    // Without the operator secret: refused, the name stays bound.
    let mut stranger = session();
    let request = Request::ReleaseName {
        user: alice.name.clone(),
        proof: proto::identity::release_proof(b"guess", &stranger.nonce, &alice.name),
    };
    assert_eq!(
        code(fixture.handle(&mut stranger, request, T0).await),
        ErrorCode::Unauthorized
    );
    // A proof for another name does not release this one.
    let mut operator = session();
    let request = Request::ReleaseName {
        user: alice.name.clone(),
        proof: proto::identity::release_proof(SECRET, &operator.nonce, &name("bob")),
    };
    assert_eq!(
        code(fixture.handle(&mut operator, request, T0).await),
        ErrorCode::Unauthorized
    );
    let request = Request::ReleaseName {
        user: alice.name.clone(),
        proof: proto::identity::release_proof(SECRET, &operator.nonce, &alice.name),
    };
    assert_eq!(
        fixture.handle(&mut operator, request.clone(), T0).await,
        Ok(Reply::Released {
            fingerprint: alice.identity.public().fingerprint()
        })
    );
    assert_eq!(
        code(fixture.handle(&mut operator, request, T0).await),
        ErrorCode::UnknownUser
    );
    // A new key takes the name as a first registration.
    let fresh = Identity::generate();
    let mut session = session();
    let request = registration(&session, &alice.name, &fresh, vec![4000]);
    assert!(matches!(
        fixture.handle(&mut session, request, T0 + 1).await,
        Ok(Reply::Registered {
            new_binding: true,
            ..
        })
    ));
}

/// The published presence events a watch request causes (the embedded store delivers
/// them to every subscriber at once).
fn published(events: &mut tokio::sync::broadcast::Receiver<Broadcast>) -> Vec<Broadcast> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

#[tokio::test]
async fn a_watch_tells_the_new_contacts_and_asks_them_to_answer() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let mut events = fixture.store.subscribe();
    assert!(!alice.session.wants_new_pushes(), "not before it asks");
    let watch = Request::Watch {
        users: vec![name("bob"), name("alice"), name("bob")],
    };
    assert_eq!(
        fixture.handle(&mut alice.session, watch.clone(), T0).await,
        Ok(Reply::Watching {
            watched: 1,
            room: proto::msg::MAX_WATCHED as u32 - 1
        })
    );
    assert!(alice.session.wants_new_pushes());
    assert_eq!(
        published(&mut events),
        vec![Broadcast::Presence {
            user: name("alice"),
            online: true,
            to: vec![name("bob")],
            answer: true,
        }]
    );
    // Watching bob again tells no one anything.
    fixture.handle(&mut alice.session, watch, T0).await.unwrap();
    assert_eq!(published(&mut events), vec![]);
}

#[tokio::test]
async fn a_contacts_presence_reaches_only_a_session_that_watches_them_and_answers_once_asked() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let mut old = registered(&fixture, "olivia", T0).await;
    let watch = Request::Watch {
        users: vec![name("bob")],
    };
    fixture.handle(&mut alice.session, watch, T0).await.unwrap();
    let online = Push::Presence {
        user: name("bob"),
        online: true,
    };
    // Bob watches alice and asks for an answer: alice's client hears, and she answers.
    assert_eq!(
        alice.session.presence_of(&name("bob"), true, true, T0),
        (
            Some(online),
            Some(Broadcast::Presence {
                user: name("alice"),
                online: true,
                to: vec![name("bob")],
                answer: false,
            })
        )
    );
    // Mallory, whom alice does not watch, gets neither a push nor an answer.
    assert_eq!(
        alice.session.presence_of(&name("mallory"), true, true, T0),
        (None, None)
    );
    // A client that never asked gets nothing, even about a user it might know.
    assert_eq!(
        old.session.presence_of(&name("bob"), true, true, T0),
        (None, None)
    );
}

#[tokio::test]
async fn leaving_owes_the_watch_set_an_offline_notice_once_and_unwatch_tells_the_dropped() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let mut events = fixture.store.subscribe();
    let watch = Request::Watch {
        users: vec![name("bob"), name("carol")],
    };
    fixture.handle(&mut alice.session, watch, T0).await.unwrap();
    published(&mut events);
    let unwatch = Request::Unwatch {
        users: vec![name("carol"), name("dave")],
    };
    fixture
        .handle(&mut alice.session, unwatch, T0)
        .await
        .unwrap();
    assert_eq!(
        published(&mut events),
        vec![Broadcast::Presence {
            user: name("alice"),
            online: false,
            to: vec![name("carol")],
            answer: false,
        }]
    );
    assert_eq!(
        alice.session.take_offline_notice(&name("alice")),
        Some(Broadcast::Presence {
            user: name("alice"),
            online: false,
            to: vec![name("bob")],
            answer: false,
        })
    );
    assert_eq!(alice.session.take_offline_notice(&name("alice")), None);
}

#[tokio::test]
async fn a_watch_past_the_bound_is_refused_whole() {
    let fixture = Fixture::new();
    let mut alice = registered(&fixture, "alice", T0).await;
    let users: Vec<Username> = (0..=proto::msg::MAX_WATCHED)
        .map(|index| name(&format!("u{index}")))
        .collect();
    assert_eq!(
        code(
            fixture
                .handle(&mut alice.session, Request::Watch { users }, T0)
                .await
        ),
        ErrorCode::TooLarge
    );
    assert_eq!(fixture.metrics.watch_refused.get(), 1);
    // Unregistered, a watch is refused like any other request.
    let mut stranger = session();
    let watch = Request::Watch {
        users: vec![name("bob")],
    };
    assert_eq!(
        code(fixture.handle(&mut stranger, watch, T0).await),
        ErrorCode::NotRegistered
    );
}
