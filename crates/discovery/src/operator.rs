//! The operator: the secret kept in the server's data dir (mode 0600) that proves an
//! announcement or a name release comes from whoever runs the server, and the client side
//! of those commands: [`announce`] (`p2pchat-discovery announce <text>`) and
//! [`release_name`] (`p2pchat-discovery release-name <name>`), both through [`ask`], which
//! proves the secret over the running server's challenge.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use proto::{
    Connection, ErrorReply, Reply, Request, RequestFrame, ServerMsg, Username,
    identity::{
        announce_proof, check_private, create_private_dir, release_proof, write_private_new,
    },
};
use tokio::net::TcpStream;

/// The file in the data dir holding the operator secret.
pub const OPERATOR_SECRET_FILE: &str = "operator.secret";
const SECRET_LEN: usize = 32;

/// Why the secret could not be read or the announcement not made.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The secret file or its folder is unusable.
    #[error(transparent)]
    Secret(#[from] proto::IdentityError),
    /// The secret file is missing: the server has not run with this data dir.
    #[error("no operator secret at {0}: start the server with this --data-dir first")]
    Missing(PathBuf),
    /// Reading or writing the secret file failed.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The server could not be reached or spoke nonsense.
    #[error("cannot talk to the server at {server}: {reason}")]
    Connect {
        /// The address.
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// The server refused the request.
    #[error("the server refused: {0}")]
    Refused(ErrorReply),
    /// The announcement is larger than a server takes before registration, and the server
    /// closed the connection on it.
    #[error(
        "the announcement is too large: {len} bytes as sent, and the server takes at most \
         {limit} bytes before registration (unless its --preauth-max-frame says more); \
         shorten the text"
    )]
    TooLarge {
        /// The request's encoded size.
        len: usize,
        /// The default limit of the server.
        limit: usize,
    },
}

/// Reads the operator secret from `data_dir`, creating a random one (0600 in a 0700 folder)
/// on first use.
pub fn load_or_create_secret(data_dir: &Path) -> Result<Vec<u8>, OperatorError> {
    match load_secret(data_dir) {
        Err(OperatorError::Missing(_)) => {
            create_private_dir(data_dir)?;
            let secret: [u8; SECRET_LEN] = proto::random_bytes();
            // Published whole or not at all; if another process made one meanwhile, its
            // secret is the one.
            if write_private_new(data_dir, OPERATOR_SECRET_FILE, &secret)? {
                Ok(secret.to_vec())
            } else {
                load_secret(data_dir)
            }
        }
        other => other,
    }
}

/// Reads the operator secret from `data_dir`, refusing a file others can read.
pub fn load_secret(data_dir: &Path) -> Result<Vec<u8>, OperatorError> {
    let path = data_dir.join(OPERATOR_SECRET_FILE);
    match fs::read(&path) {
        Ok(secret) if secret.len() == SECRET_LEN => {
            check_private(&path, 0o600)?;
            Ok(secret)
        }
        Ok(_) => Err(OperatorError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "wrong length"),
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Err(OperatorError::Missing(path))
        }
        Err(source) => Err(OperatorError::Io { path, source }),
    }
}

/// Asks the server at `server` to announce `text`, proving the operator `secret`. With
/// `expected`, the server must present that key (the operator's own instance's key file),
/// so the announcement goes nowhere else.
pub async fn announce(
    server: &str,
    secret: &[u8],
    text: &str,
    expected: Option<proto::ServerPublicKey>,
) -> Result<(), OperatorError> {
    let build = |nonce: &[u8; 32]| Request::Announce {
        text: text.to_owned(),
        proof: announce_proof(secret, nonce, text),
    };
    match ask(server, expected, build).await? {
        Reply::Done => Ok(()),
        other => Err(unexpected(server, &other)),
    }
}

/// Asks the server at `server` to release `user`'s name, proving the operator `secret`;
/// returns the fingerprint of the keys the name was bound to. The server logs it.
pub async fn release_name(
    server: &str,
    secret: &[u8],
    user: &Username,
    expected: Option<proto::ServerPublicKey>,
) -> Result<String, OperatorError> {
    let build = |nonce: &[u8; 32]| Request::ReleaseName {
        user: user.clone(),
        proof: release_proof(secret, nonce, user),
    };
    match ask(server, expected, build).await? {
        Reply::Released { fingerprint } => Ok(fingerprint),
        other => Err(unexpected(server, &other)),
    }
}

fn unexpected(server: &str, reply: &Reply) -> OperatorError {
    OperatorError::Connect {
        server: server.to_owned(),
        reason: format!("unexpected answer {reply:?}"),
    }
}

/// Connects to the server at `server` (which must present `expected`, when given), and
/// sends the one operator request `build` makes from the server's challenge; returns the
/// reply.
async fn ask(
    server: &str,
    expected: Option<proto::ServerPublicKey>,
    build: impl FnOnce(&[u8; 32]) -> Request,
) -> Result<Reply, OperatorError> {
    let failed = |reason: String| OperatorError::Connect {
        server: server.to_owned(),
        reason,
    };
    let timeout = Duration::from_secs(10);
    let stream = tokio::time::timeout(timeout, TcpStream::connect(server))
        .await
        .map_err(|_| failed("timed out connecting".into()))?
        .map_err(|error| failed(error.to_string()))?;
    let mut connection = Connection::new(stream);
    let secured = connection
        .client_handshake(timeout)
        .await
        .map_err(|error| failed(error.to_string()))?;
    let presented = proto::ServerPublicKey(secured.remote_static);
    if let Some(expected) = expected
        && presented != expected
    {
        return Err(failed(format!(
            "the server presents key {presented}, not this data dir's key {expected}; is another server at that address?"
        )));
    }
    let exchange = async {
        let nonce = match connection.recv::<ServerMsg>().await {
            Ok(Some(ServerMsg::Challenge { nonce })) => nonce,
            Ok(Some(ServerMsg::Closing(reason))) => return Err(OperatorError::Refused(reason)),
            other => return Err(failed(format!("expected a challenge, got {other:?}"))),
        };
        let request = RequestFrame {
            id: 1,
            request: build(&nonce),
        };
        // A server closes the connection on a frame over its limit before reading it, so
        // the write or the read after it fails without the server's reason: a request over
        // the default limit is named as the cause.
        let limit = crate::Config::default().preauth_max_frame_len;
        let len = proto::wire::encoded_len(&request).unwrap_or(usize::MAX);
        let failed = |reason: String| {
            if len > limit {
                OperatorError::TooLarge { len, limit }
            } else {
                failed(reason)
            }
        };
        connection
            .send(&request)
            .await
            .map_err(|error| failed(error.to_string()))?;
        match connection.recv::<ServerMsg>().await {
            Ok(Some(ServerMsg::Response {
                result: Ok(reply), ..
            })) => Ok(reply),
            Ok(Some(ServerMsg::Response {
                result: Err(error), ..
            })) => Err(OperatorError::Refused(error)),
            Ok(Some(ServerMsg::Closing(reason))) => Err(OperatorError::Refused(reason)),
            other => Err(failed(format!("unexpected answer {other:?}"))),
        }
    };
    let result = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| failed("no answer in time".into()))?;
    connection.close().await;
    result
}
