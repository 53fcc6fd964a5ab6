//! Contact presence and the second-session notice with the real binaries: two users who
//! talked hear each other come and go (also across two discovery instances on one Redis), a
//! stranger who watches a user at the server never learns her presence, and a user's
//! earlier session hears that a new one signed in.

use std::net::SocketAddr;

use proto::{Push, Reply, Request, RequestFrame, ServerMsg, Username};
use serde_json::Value;
use store::testing::RedisServer;

use crate::util::{Discovery, Listener, User, WAIT};

fn presence(user: &'static str, online: bool) -> impl Fn(&Value) -> bool {
    move |event| event["event"] == "presence" && event["user"] == user && event["online"] == online
}

/// Alice writes to bob, each on `alice_server` and `bob_server`: from then on they are
/// each other's contacts, and each hears that the other is online.
fn contacts(alice_server: &Discovery, bob_server: &Discovery) -> (User, Listener, User, Listener) {
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let mut alice_listener = alice.listen(alice_server);
    alice_listener.online();
    let mut bob_listener = bob.listen(bob_server);
    bob_listener.online();
    alice_listener.ok("send bob hello bob");
    bob_listener.message("hello bob");
    alice_listener.expect("bob online", presence("bob", true));
    bob_listener.expect("alice online", presence("alice", true));
    (alice, alice_listener, bob, bob_listener)
}

/// A raw control connection registered as a stranger who asks the server to watch
/// `watched`, as a modified client could.
struct Stranger {
    runtime: tokio::runtime::Runtime,
    connection: proto::Connection<tokio::net::TcpStream>,
    next_id: u64,
    pushes: Vec<Push>,
}

impl Stranger {
    fn watching(server: SocketAddr, watched: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let connection = runtime.block_on(async {
            let stream = tokio::net::TcpStream::connect(server)
                .await
                .expect("connect");
            let mut connection = proto::Connection::new(stream);
            let secured = connection.client_handshake(WAIT).await.expect("handshake");
            let Ok(Some(ServerMsg::Challenge { nonce })) = connection.recv::<ServerMsg>().await
            else {
                panic!("no challenge");
            };
            let identity = proto::Identity::generate();
            let user = Username::new("mallory").expect("a name");
            let transcript = proto::identity::registration_transcript(
                &nonce,
                &secured.handshake_hash,
                &user,
                identity.public(),
            );
            let register = Request::Register(proto::Registration {
                user,
                keys: identity.public().clone(),
                listen_ports: Vec::new(),
                signature: identity.sign(&transcript),
            });
            connection
                .send(&RequestFrame {
                    id: 1,
                    request: register,
                })
                .await
                .expect("send");
            connection
        });
        let mut stranger = Self {
            runtime,
            connection,
            next_id: 2,
            pushes: Vec::new(),
        };
        stranger.wait_for_response(1);
        let users = vec![Username::new(watched).expect("a name")];
        let reply = stranger.request(Request::Watch { users });
        assert!(matches!(reply, Reply::Watching { .. }), "{reply:?}");
        stranger
    }

    fn request(&mut self, request: Request) -> Reply {
        let id = self.next_id;
        self.next_id += 1;
        self.runtime
            .block_on(self.connection.send(&RequestFrame { id, request }))
            .expect("send");
        self.wait_for_response(id)
    }

    fn wait_for_response(&mut self, id: u64) -> Reply {
        loop {
            let connection = &mut self.connection;
            let received = self.runtime.block_on(async {
                tokio::time::timeout(WAIT, connection.recv::<ServerMsg>()).await
            });
            match received {
                Ok(Ok(Some(ServerMsg::Response {
                    id: answered,
                    result,
                }))) if answered == id => {
                    return result.expect("the request succeeds");
                }
                Ok(Ok(Some(ServerMsg::Push(push)))) => self.pushes.push(push),
                other => panic!("expected a response, got {other:?}"),
            }
        }
    }

    /// Every presence push received by the time a heartbeat is answered.
    fn presence_pushes(&mut self) -> Vec<Push> {
        self.request(Request::Heartbeat);
        self.pushes
            .iter()
            .filter(|push| matches!(push, Push::Presence { .. }))
            .cloned()
            .collect()
    }
}

#[test]
fn contacts_hear_each_other_come_and_go_and_a_stranger_watching_learns_nothing() {
    let server = Discovery::start();
    let (alice, mut alice_listener, _bob, bob_listener) = contacts(&server, &server);
    let mut stranger = Stranger::watching(server.address, "alice");

    bob_listener.stop();
    alice_listener.expect("bob offline", presence("bob", false));
    alice_listener.stop();
    let mut alice_again = alice.listen(&server);
    alice_again.online();
    // Alice's own link events are `online`/`offline`; none of her presence reached the
    // stranger, neither her leaving nor her return.
    assert_eq!(stranger.presence_pushes(), vec![]);
}

#[test]
fn contacts_on_two_instances_sharing_one_redis_hear_each_other_come_and_go() {
    let Ok(redis) = RedisServer::start() else {
        eprintln!("skipped: redis-server is not installed");
        return;
    };
    let first = Discovery::start_with(Some(redis.url()));
    let second = Discovery::start_with(Some(redis.url()));
    let (_alice, mut alice_listener, bob, bob_listener) = contacts(&first, &second);
    bob_listener.stop();
    alice_listener.expect("bob offline", presence("bob", false));
    let mut bob_again = bob.listen(&second);
    bob_again.online();
    alice_listener.expect("bob online again", presence("bob", true));
    bob_again.expect("alice online", presence("alice", true));
}

#[test]
fn an_earlier_session_hears_that_the_user_signed_in_elsewhere() {
    let server = Discovery::start();
    let (alice, elsewhere) = one_identity_twice(&server);
    let mut first = alice.listen(&server);
    first.online();
    let mut second = elsewhere.listen(&server);
    second.online();
    let notice = first.expect("the second-session notice", |event| {
        event["event"] == "session_elsewhere"
    });
    assert_eq!(notice["observed"], "127.0.0.1", "{notice}");
    // The new session is not told about itself, and both stay connected.
    let extra = second.drain_for(std::time::Duration::from_millis(500));
    assert!(
        !extra
            .iter()
            .any(|event| event["event"] == "session_elsewhere"),
        "{extra:?}"
    );
    first.ok("list");
}

/// Alice, registered once, and the same identity in a second data dir (exported and
/// imported, as onto a second machine).
pub fn one_identity_twice(server: &Discovery) -> (User, User) {
    let alice = User::new("alice");
    alice.register_and_leave(server);
    let backup = alice.home.with_file_name("alice.backup");
    let backup = backup.to_str().expect("a UTF-8 path");
    let passphrase = ("P2PCHAT_PASSPHRASE", "correct horse battery staple");
    let exported = alice.run(server, &[passphrase], &["identity", "export", backup]);
    assert!(exported.status.success(), "{exported:?}");
    let elsewhere = User::new("alice");
    let imported = elsewhere.run(server, &[passphrase], &["identity", "import", backup]);
    assert!(imported.status.success(), "{imported:?}");
    (alice, elsewhere)
}
