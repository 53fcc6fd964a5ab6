//! `p2pchat`: the command-line client.
//!
//! - `p2pchat [--user NAME]`: interactive (rustyline, see [`editor`]). Incoming messages,
//!   announcements and warnings print above the prompt through its [`editor::Screen`]; Tab
//!   completes commands and names; log lines go to
//!   `p2pchat.log` in the user's data dir; command history is kept in `command_history`
//!   there. Without `--user` it asks for the name first. `chat <user>` opens a conversation:
//!   the prompt names the user and plain lines go to them; a message from anyone else rings
//!   the terminal's bell.
//! - `p2pchat send <user> <message>`: exits 0 once delivered or queued, [`EXIT_KEPT`] when
//!   the message is kept in the outbox and will go out (do not send it again), 1 when it
//!   was not sent or failed for good.
//! - `p2pchat listen [--json]`: one line per event, flushed per line (JSON objects with
//!   `--json`, else the interactive client's lines); commands on standard input
//!   (interactive syntax) are answered with `{"event":"result",...}` lines (with `--json`);
//!   messages stored but never shown are printed at the next start.
//!
//! Parsing lives in [`command`], wording in [`render`]; the runtime is the `peer` crate.

mod chats;
mod command;
mod editor;
mod render;

use std::{
    io::{BufRead, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use peer::{Client, Config, Event, Events, Status};
use proto::Username;
use tokio_util::sync::CancellationToken;

use crate::command::Command;

/// The p2pchat client: end-to-end encrypted peer-to-peer chat.
#[derive(Debug, Parser)]
#[command(name = "p2pchat", version, about)]
struct Cli {
    /// The discovery server (host:port).
    #[arg(
        long,
        env = "P2PCHAT_SERVER",
        default_value = "127.0.0.1:5001",
        global = true
    )]
    server: String,
    /// Your username ([a-z0-9_-]{1,32}); asked for when missing in interactive mode.
    #[arg(long, short, env = "P2PCHAT_USER", global = true)]
    user: Option<String>,
    /// The data dir (each user gets a folder in it); default: the platform's data dir
    /// (`~/.local/share/p2pchat` on Linux), printed at start.
    #[arg(long, env = "P2PCHAT_HOME", global = true)]
    home: Option<PathBuf>,
    /// The port to accept peer connections on, on every interface (0: any free port).
    #[arg(long, default_value_t = 0, global = true)]
    port: u16,
    /// The address to accept peer connections on (`host:port`; default `0.0.0.0:<--port>`,
    /// every interface), e.g. `127.0.0.1:0` to take peers from this machine only.
    #[arg(
        long,
        env = "P2PCHAT_PEER_LISTEN",
        global = true,
        conflicts_with = "port"
    )]
    listen: Option<std::net::SocketAddr>,
    /// Milliseconds without an answer to a heartbeat before the server connection is
    /// treated as dead (default 10000). For tests of network faults.
    #[arg(long, env = "P2PCHAT_PONG_TIMEOUT_MS", global = true, hide = true)]
    pong_timeout_ms: Option<u64>,
    /// Milliseconds a direct connection attempt to a peer may take (default 3000). For tests
    /// of network faults.
    #[arg(long, env = "P2PCHAT_CONNECT_TIMEOUT_MS", global = true, hide = true)]
    connect_timeout_ms: Option<u64>,
    /// The discovery server's key fingerprint, as `p2pchat-discovery key` prints it: the
    /// server must present this key, and it is pinned. Without it, the key the server
    /// presents at first contact is pinned, and a later change is refused. Empty: none.
    #[arg(long, env = "P2PCHAT_SERVER_KEY", global = true)]
    server_key: Option<String>,
    /// Do not send read receipts: senders are not told when your screen (or `listen`)
    /// showed their messages. Delivered receipts for mail still go, and others' read
    /// receipts are still shown. Also `P2PCHAT_READ_RECEIPTS=0`.
    #[arg(long, global = true)]
    no_read_receipts: bool,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Send one message and exit: 0 once delivered or queued; 3 when it is kept in the
    /// outbox and will go out at this user's next start (do not send it again); 1 when it
    /// was not sent (nothing kept) or failed for good.
    Send {
        /// The recipient.
        to: String,
        /// The message (several words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        message: Vec<String>,
    },
    /// Print received messages and events until stopped (Ctrl-C, SIGTERM); commands read
    /// from standard input (interactive syntax, one per line) are answered too.
    Listen {
        /// One JSON object per line, commands answered with `result` objects (for scripts);
        /// without it, the lines the interactive client shows.
        #[arg(long)]
        json: bool,
    },
    /// Accept the key the discovery server presents now, replacing the one pinned for it
    /// (after its key changed and you checked the new fingerprint with the operator). With
    /// --server-key, only that key is accepted.
    TrustServer,
    /// Back up, restore or replace your identity (run while p2pchat is not running for
    /// this user). The passphrase is asked on the terminal, or taken from
    /// P2PCHAT_PASSPHRASE.
    Identity {
        #[command(subcommand)]
        action: IdentityAction,
    },
}

#[derive(Debug, Subcommand)]
enum IdentityAction {
    /// Write a passphrase-protected backup of your identity key, your name and your
    /// contacts' pinned keys to FILE (mode 0600): restore it with `identity import` to keep
    /// your name on a new machine or after losing your data dir.
    Export {
        /// The backup file to write.
        file: PathBuf,
    },
    /// Restore a backup made by `identity export` into the data dir (the user is the
    /// backup's). An identity already here that is another one is replaced only with
    /// --force.
    Import {
        /// The backup file to read.
        file: PathBuf,
        /// Replace a different identity already in the data dir (it is lost unless backed
        /// up).
        #[arg(long)]
        force: bool,
    },
    /// Replace your keys with new ones: the server moves your name to them on a statement
    /// signed with your current key, which your contacts' clients check, so they follow
    /// without a `trust`. The old key is kept until the server confirmed.
    Rotate,
}

/// The environment variable a script gives the backup passphrase in.
const PASSPHRASE_ENV: &str = "P2PCHAT_PASSPHRASE";
/// Set to `0` (or `false`, `off`, `no`) to send no read receipts, as `--no-read-receipts`.
const READ_RECEIPTS_ENV: &str = "P2PCHAT_READ_RECEIPTS";

/// Whether to send read receipts: on unless `--no-read-receipts` or
/// `P2PCHAT_READ_RECEIPTS` says off.
fn read_receipts_on(no_read_receipts: bool, env: Option<&str>) -> bool {
    let off_by_env = env.is_some_and(|value| {
        matches!(
            value.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "off" | "no"
        )
    });
    !no_read_receipts && !off_by_env
}

/// `p2pchat send`'s exit code for a message kept in the outbox: it goes out at this user's
/// next start (of any mode), so a script must not send it again. Distinct from 1 (not
/// sent, or failed for good) and 2 (bad command line).
const EXIT_KEPT: u8 = 3;

/// How long a scripted command waits to get online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long quitting the prompt waits for the commands typed before it.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Commands typed and not yet taken by the worker that runs them in order; past this
/// (a paste of more lines while the server is slow to answer), the prompt waits.
const TYPED_COMMANDS_QUEUED: usize = 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("p2pchat: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("p2pchat: {error:#}");
            ExitCode::FAILURE
        }
    };
    // A read of standard input (`listen`'s command reader) sits in a blocking thread that
    // nothing can interrupt; the runtime must not wait for it on the way out.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    code
}

/// How long the runtime waits for leftover blocking work after everything has stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Empty is none: Compose passes the variable through whether it is set or not.
    let server_key = match cli.server_key.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(text.parse::<proto::Fingerprint>()?),
    };
    let interactive = cli.mode.is_none();
    let home = match &cli.home {
        Some(home) => home.clone(),
        None => directories::ProjectDirs::from("", "", "p2pchat")
            .context("cannot find a data dir for this platform; set P2PCHAT_HOME")?
            .data_dir()
            .to_path_buf(),
    };
    // An import learns its user from the backup.
    if let Some(Mode::Identity {
        action: IdentityAction::Import { file, force },
    }) = &cli.mode
    {
        return identity_import(&home, cli.user.as_deref(), file, *force).await;
    }
    let user = match &cli.user {
        Some(name) => Username::new(name).with_context(|| format!("invalid username {name:?}"))?,
        None if interactive => ask_username()?,
        None => bail!("--user (or P2PCHAT_USER) is required for scripted commands"),
    };
    proto::identity::create_private_dir(&home)?;
    let data_dir = home.join(user.as_str());
    proto::identity::create_private_dir(&data_dir)?;
    init_tracing(interactive, &data_dir)?;

    match &cli.mode {
        Some(Mode::TrustServer) => return trust_server(&cli.server, &data_dir, server_key).await,
        Some(Mode::Identity {
            action: IdentityAction::Export { file },
        }) => return identity_export(&data_dir, &user, file),
        Some(Mode::Identity {
            action: IdentityAction::Rotate,
        }) => {
            let config = Config::new(cli.server.clone(), user.clone(), data_dir.clone());
            return identity_rotate(&config, server_key).await;
        }
        _ => {}
    }
    let mut config = Config::new(cli.server.clone(), user, data_dir.clone());
    config.server_key = server_key;
    config.listen = cli
        .listen
        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], cli.port)));
    if let Some(ms) = cli.pong_timeout_ms {
        config.pong_timeout = Duration::from_millis(ms.max(1));
    }
    if let Some(ms) = cli.connect_timeout_ms {
        config.connect_timeout = Duration::from_millis(ms.max(1));
    }
    config.read_receipts = read_receipts_on(
        cli.no_read_receipts,
        std::env::var(READ_RECEIPTS_ENV).ok().as_deref(),
    );
    let shutdown = CancellationToken::new();
    let (client, events) = peer::start(config, shutdown.clone())
        .await
        .context("cannot start the client")?;
    let look = render::Look::for_stdout(Some(client.local_addr().port()));
    let code = match cli.mode {
        None => interactive_mode(&client, events, &data_dir, &cli.server, look).await,
        Some(Mode::Send { to, message }) => {
            // Nothing here shows events: let them go, so the runtime never waits for room
            // for them (messages that arrive meanwhile stay unshown, for the next start).
            drop(events);
            send_mode(&client, &to, &message.join(" ")).await
        }
        Some(Mode::Listen { json }) => listen_mode(&client, events, &data_dir, json, look).await,
        Some(Mode::TrustServer | Mode::Identity { .. }) => {
            unreachable!("handled before the runtime starts")
        }
    };
    client.shutdown(DRAIN_TIMEOUT).await;
    code
}

/// `p2pchat trust-server`: shows the key the server presents and pins it.
async fn trust_server(
    server: &str,
    data_dir: &Path,
    expected: Option<proto::Fingerprint>,
) -> anyhow::Result<ExitCode> {
    let presented = peer::control::presented_key(server, ONLINE_TIMEOUT).await?;
    if let Some(expected) = expected
        && !presented.matches(&expected)
    {
        bail!(
            "the server at {server} presents key {presented}, not {expected}; nothing was pinned"
        );
    }
    let trust = peer::server_trust::ServerTrust::new(data_dir, None);
    match trust.replace(server, presented).await? {
        Some(before) if before == presented => {
            println!("the server at {server} presents key {presented}, already pinned")
        }
        Some(before) => println!(
            "pinned key {presented} for the server at {server} (was {before}); compare it with the fingerprint the operator gives (`p2pchat-discovery key`)"
        ),
        None => println!(
            "pinned key {presented} for the server at {server}; compare it with the fingerprint the operator gives (`p2pchat-discovery key`)"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// The backup passphrase: from [`PASSPHRASE_ENV`] if set, else asked on the terminal
/// without echo (twice when `confirm`, for a new backup).
fn passphrase(confirm: bool) -> anyhow::Result<String> {
    if let Ok(passphrase) = std::env::var(PASSPHRASE_ENV)
        && !passphrase.is_empty()
    {
        return Ok(passphrase);
    }
    let first = rpassword::prompt_password("backup passphrase: ")
        .with_context(|| format!("cannot read the passphrase (or set {PASSPHRASE_ENV})"))?;
    if first.is_empty() {
        bail!("the passphrase is empty; nothing was done");
    }
    if confirm {
        let again = rpassword::prompt_password("the same passphrase again: ")
            .context("cannot read the passphrase")?;
        if again != first {
            bail!("the two passphrases differ; nothing was done");
        }
    }
    Ok(first)
}

/// `p2pchat identity export <file>`.
fn identity_export(data_dir: &Path, user: &Username, file: &Path) -> anyhow::Result<ExitCode> {
    let passphrase = passphrase(true)?;
    let exported = peer::backup::export(
        data_dir,
        user,
        &passphrase,
        proto::backup::KdfParams::default(),
        file,
    )?;
    println!(
        "wrote a backup of {user}'s identity ({}) and {} pinned contact keys to {}; keep it and its passphrase apart",
        exported.fingerprint,
        exported.pins,
        file.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `p2pchat identity import <file> [--force]`: the user is the backup's (`--user`, if given,
/// must name the same).
async fn identity_import(
    home: &Path,
    asked: Option<&str>,
    file: &Path,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let contents = peer::backup::read(file, &passphrase(false)?)?;
    if let Some(asked) = asked
        && asked != contents.user.as_str()
    {
        bail!(
            "this backup is {}'s, not {asked}'s; nothing was imported",
            contents.user
        );
    }
    proto::identity::create_private_dir(home)?;
    let data_dir = home.join(contents.user.as_str());
    let imported = peer::backup::import(&data_dir, &contents, force).await?;
    println!(
        "restored {}'s identity ({}){} and {} pinned contact keys into {}",
        contents.user,
        imported.fingerprint,
        if imported.replaced {
            ", replacing the one there"
        } else {
            ""
        },
        imported.pins,
        data_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `p2pchat identity rotate`.
async fn identity_rotate(
    config: &Config,
    server_key: Option<proto::Fingerprint>,
) -> anyhow::Result<ExitCode> {
    let control = peer::control::ControlConfig {
        server: config.server.clone(),
        user: config.user.clone(),
        listen_port: 0,
        pong_timeout: config.pong_timeout,
        heartbeat_interval: config.heartbeat_interval,
        backoff_min: config.backoff_min,
        backoff_max: config.backoff_max,
        trust: peer::server_trust::ServerTrust::new(&config.data_dir, server_key),
    };
    let rotated = peer::backup::rotate(&config.data_dir, &control).await?;
    println!(
        "{}'s keys are rotated: {} replaces {}. Contacts who pinned the old key follow by the signed statement; make a new backup (`p2pchat identity export`), the old one holds the old key",
        config.user, rotated.new, rotated.old
    );
    Ok(ExitCode::SUCCESS)
}

/// Asks for a username on the terminal until a valid one is given.
fn ask_username() -> anyhow::Result<Username> {
    let stdin = std::io::stdin();
    loop {
        print!("username: ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            bail!("no username given");
        }
        match Username::new(line.trim()) {
            Ok(user) => return Ok(user),
            Err(error) => println!("{error}"),
        }
    }
}

fn init_tracing(interactive: bool, data_dir: &Path) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if interactive { "info" } else { "warn" })
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if interactive {
        // Log lines would garble the prompt: they go to a file in the data dir.
        let path = data_dir.join("p2pchat.log");
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .init();
    } else {
        builder.with_writer(std::io::stderr).init();
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn send_mode(client: &Client, to: &str, body: &str) -> anyhow::Result<ExitCode> {
    let to = Username::new(to).with_context(|| format!("invalid recipient {to:?}"))?;
    // Ctrl-C or SIGTERM ends the wait cleanly (the caller then shuts the runtime down,
    // which finishes its writes), saying what became of the message.
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let online = tokio::select! {
        biased;
        () = &mut signal => bail!("interrupted; message not sent"),
        online = client.wait_online(ONLINE_TIMEOUT) => online,
    };
    if let Err(error) = online {
        bail!("{error}; message not sent");
    }
    let result = client.submit_send(&to, body).await?;
    let report = tokio::select! {
        biased;
        () = &mut signal => {
            eprintln!(
                "p2pchat: interrupted; the message is in the outbox and goes out at this \
                 user's next start (do not send it again)"
            );
            return Ok(ExitCode::from(EXIT_KEPT));
        }
        report = result => report?,
    };
    let status = render::terminal_safe(&render::status_text(&to, &report.status));
    let kept = matches!(
        report.status,
        peer::DeliveryStatus::Failed {
            will_retry: true,
            ..
        }
    );
    if report.status.is_success() {
        println!("{}: {status}", report.id);
        Ok(ExitCode::SUCCESS)
    } else if kept {
        eprintln!(
            "p2pchat: message {} to {to} {status}; it goes out at this user's next start \
             (do not send it again)",
            report.id
        );
        Ok(ExitCode::from(EXIT_KEPT))
    } else {
        eprintln!("p2pchat: message to {to} {status}");
        Ok(ExitCode::FAILURE)
    }
}

/// `listen`: every event as one line (a JSON object with `--json`); commands read from
/// standard input (one per line, the interactive syntax) run in order, each answered by a
/// result (a `result` object with `--json`, else its text).
/// The most messages `listen` prints before marking them shown (one write).
const MAX_MARKED_AT_ONCE: usize = 4096;

async fn listen_mode(
    client: &Client,
    mut events: Events,
    client_data_dir: &Path,
    json: bool,
    look: render::Look,
) -> anyhow::Result<ExitCode> {
    // A `result`'s text is data for a program: never coloured, even on a terminal.
    let look = if json { look.without_colour() } else { look };
    let signal = shutdown_signal();
    tokio::pin!(signal);
    // Commands run one at a time, in order, in their own task, so a send waiting for its
    // ack never holds up the events.
    let (results_tx, mut results) = tokio::sync::mpsc::channel::<(String, Outcome)>(16);
    let chats_path = client_data_dir.join(chats::CHATS_FILE);
    let chats = Arc::new(Mutex::new(chats::Chats::load(&chats_path)));
    let executor = tokio::spawn(run_stdin_commands(
        client.clone(),
        results_tx,
        look.clone(),
        Arc::clone(&chats),
    ));
    let mut stdout = std::io::stdout();
    // Printed messages whose mark as shown could not be written yet (a full disk): marked
    // with the next ones, or at the end. Nothing new is stored while writes fail, so this
    // does not grow while they do.
    let mut unmarked: Vec<peer::state::InboundMessage> = Vec::new();
    let code = loop {
        tokio::select! {
            biased;
            () = &mut signal => break ExitCode::SUCCESS,
            // Events first: an event the runtime emitted before it ran a command is printed
            // before that command's result (a bot that sees a result has seen what came
            // before it).
            event = events.recv() => {
                let Some(event) = event else { break ExitCode::SUCCESS };
                // Print every event already here, then mark the printed messages shown in
                // one write: display costs a commit per burst, not per message. A message
                // is marked only once printed and flushed, so a crash in between shows it
                // again at the next start (never hides it).
                let mut printed = Vec::new();
                let mut fatal = None;
                let mut next = Some(event);
                while let Some(event) = next {
                    // Counted before it is printed: a bot that has read the message and
                    // asks `chats` at once finds it counted.
                    if let Event::Message(message) = &event {
                        lock(&chats).received(&message.from, message.sent_at_ms);
                    }
                    if json {
                        writeln!(stdout, "{}", render::event_json(&event))?;
                    } else if let Some(text) = render::event_text(&event, &look, proto::now_ms()) {
                        writeln!(stdout, "{text}")?;
                    }
                    match event {
                        Event::Message(message) => printed.push(message),
                        Event::Fatal(reply) => {
                            fatal = Some(reply);
                            break;
                        }
                        _ => {}
                    }
                    next = (printed.len() < MAX_MARKED_AT_ONCE)
                        .then(|| events.try_recv())
                        .flatten();
                }
                stdout.flush()?;
                unmarked.append(&mut printed);
                mark_printed(client, &mut unmarked).await;
                if let Some(reply) = fatal {
                    eprintln!("p2pchat: {}", render::fatal_text(&reply));
                    break ExitCode::FAILURE;
                }
            }
            Some((line, outcome)) = results.recv() => {
                if json {
                    writeln!(stdout, "{}", outcome.json(&line))?;
                } else if !outcome.text.is_empty() {
                    writeln!(stdout, "{}", outcome.text)?;
                }
                stdout.flush()?;
            }
        }
    };
    executor.abort();
    mark_printed(client, &mut unmarked).await;
    if let Err(error) = lock(&chats).save(&chats_path) {
        tracing::warn!(%error, "cannot save the conversations' unread counts");
    }
    Ok(code)
}

/// Marks the printed messages in `unmarked` shown, in one write. If that write fails (a
/// full disk), the listener goes on and keeps them for the next try: a message already
/// printed is never printed again by this run, and one never marked is shown again at the
/// next start rather than lost.
async fn mark_printed(client: &Client, unmarked: &mut Vec<peer::state::InboundMessage>) {
    if unmarked.is_empty() {
        return;
    }
    match client.mark_shown(unmarked.iter()).await {
        Ok(()) => unmarked.clear(),
        Err(error) => tracing::warn!(
            %error,
            messages = unmarked.len(),
            "cannot record printed messages as shown yet; trying again with the next ones"
        ),
    }
}

/// The shared conversations, whatever a panic elsewhere left in them (counts only).
fn lock(chats: &Mutex<chats::Chats>) -> std::sync::MutexGuard<'_, chats::Chats> {
    chats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads commands from standard input until it ends, sending each one's line and outcome.
/// `quit` ends the input like end-of-file; the listener keeps listening either way. A
/// conversation opened here (`chat <user>`) works as at the prompt.
async fn run_stdin_commands(
    client: Client,
    results: tokio::sync::mpsc::Sender<(String, Outcome)>,
    look: render::Look,
    chats: Arc<Mutex<chats::Chats>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim().to_owned();
        let open = lock(&chats).open_user().cloned();
        let command = command::parse(&line, open.as_ref());
        if let Ok(command) = &command {
            lock(&chats).note(command, proto::now_ms());
        }
        let outcome = match command {
            Ok(Command::Nothing) => continue,
            Ok(Command::Quit) => break,
            Ok(Command::Help) => Outcome::done(command::HELP.to_owned()),
            Ok(Command::Open(user)) => Outcome::done(format!("talking to {user}"))
                .with("conversation", user.as_str().into()),
            Ok(Command::Close) => Outcome::done("no conversation open".to_owned())
                .with("conversation", serde_json::Value::Null),
            Ok(Command::Chats) => {
                let chats = lock(&chats);
                Outcome::done(render::chats_text(&chats.list(), &look, proto::now_ms()))
                    .with_all(chats.json())
            }
            Ok(Command::OpenAndSend { to, body }) => {
                execute(&client, Command::Send { to, body }, &look).await
            }
            Ok(command) => execute(&client, command, &look).await,
            Err(error) => Outcome::failed(error.to_string()),
        };
        if results.send((line, outcome)).await.is_err() {
            break;
        }
    }
}

const HISTORY_FILE: &str = "command_history";
const HISTORY_MAX: usize = 1000;

fn load_history(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|text| text.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn save_history(path: &Path, entries: &[String]) {
    let text: String = entries.iter().map(|line| format!("{line}\n")).collect();
    let written = proto::identity::open_private_file(path)
        .and_then(|mut file| file.write_all(text.as_bytes()));
    if let Err(error) = written {
        tracing::warn!(%error, "cannot save command history");
    }
}

/// Whether a message from `from` rings the bell: it does unless it belongs to the open
/// conversation (which the user is looking at).
fn rings_bell(conversation: Option<&Username>, from: &Username) -> bool {
    conversation != Some(from)
}

/// The user an event is about, if any (to learn names for completion).
fn event_user(event: &Event) -> Option<&Username> {
    match event {
        Event::Message(message) => Some(&message.from),
        Event::MuteEnded { user, .. }
        | Event::KeyChanged { user, .. }
        | Event::KeyRotated { user, .. }
        | Event::Presence { user, .. } => Some(user),
        Event::Delivery { to, .. } => Some(to),
        Event::Refused { from, .. }
        | Event::Receipt { from, .. }
        | Event::ResendAsked { from, .. } => Some(from),
        Event::Announcement { .. }
        | Event::Online { .. }
        | Event::Offline { .. }
        | Event::SessionElsewhere { .. }
        | Event::Fatal(_)
        | Event::StateError { .. } => None,
    }
}

async fn interactive_mode(
    client: &Client,
    mut events: Events,
    data_dir: &Path,
    server: &str,
    look: render::Look,
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal as _;
    let history_path = data_dir.join(HISTORY_FILE);
    let mut history = load_history(&history_path);
    history.drain(..history.len().saturating_sub(HISTORY_MAX));
    let names = editor::Names::default();
    // Lines typed ahead and not yet taken; past this the editor waits. Generous on
    // purpose: a line printed above the prompt waits for the editor to take it (rustyline's
    // printer holds one), and the editor takes it only while it reads, so the editor must
    // not wait for this loop while this loop prints; that needs this many lines typed ahead.
    let (typed_tx, mut typed) = tokio::sync::mpsc::channel(TYPED_COMMANDS_QUEUED);
    let line_editor = editor::Editor::start(
        client.user().clone(),
        history,
        HISTORY_MAX,
        names.clone(),
        typed_tx,
    )?;
    let out = line_editor.screen.clone();
    // The conversations, and the one open as the lines typed so far left it (the editor
    // keeps its own copy, for the prompt).
    let chats_path = data_dir.join(chats::CHATS_FILE);
    let mut chats = chats::Chats::load(&chats_path);
    let bell = if std::io::stdout().is_terminal() {
        "\x07"
    } else {
        ""
    };
    let (commands, ordered) = tokio::sync::mpsc::channel(TYPED_COMMANDS_QUEUED);
    let mut worker = tokio::spawn(run_in_order(
        client.clone(),
        ordered,
        out.clone(),
        look.clone(),
        names.clone(),
    ));
    out.line(format!(
        "you are {} (key {}{}), data in {}, server {server}; `help` lists commands, \
         `chat <user>` opens a conversation, Tab completes",
        client.user(),
        client.fingerprint(),
        if client.is_new_identity() {
            ", new"
        } else {
            ""
        },
        data_dir.display(),
    ));
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut code = ExitCode::SUCCESS;
    let mut quit_typed = false;
    loop {
        tokio::select! {
            biased;
            () = &mut signal => break,
            event = events.recv() => {
                let Some(event) = event else { break };
                if let Some(user) = event_user(&event) {
                    names.learn(user);
                }
                if let Event::Message(message) = &event {
                    chats.received(&message.from, message.sent_at_ms);
                }
                if let Some(text) = render::event_text(&event, &look, proto::now_ms()) {
                    let ring = match &event {
                        Event::Message(message) => rings_bell(chats.open_user(), &message.from),
                        _ => false,
                    };
                    out.line(format!("{}{text}", if ring { bell } else { "" }));
                }
                match &event {
                    Event::Message(message) => {
                        if let Err(error) = client.mark_shown([message]).await {
                            out.line(format!("cannot record the message as shown: {error}"));
                        }
                    }
                    Event::Fatal(_) => {
                        code = ExitCode::FAILURE;
                        break;
                    }
                    _ => {}
                }
            }
            line = typed.recv() => {
                let Some(editor::Typed { command }) = line else { break };
                let was_open = chats.open_user().cloned();
                if let Ok(command) = &command {
                    chats.note(command, proto::now_ms());
                }
                if let Ok(Command::Open(user) | Command::OpenAndSend { to: user, .. }) = &command
                    && was_open.as_ref() != Some(user)
                {
                    out.line(format!(
                        "talking to {user}: plain lines go to {user}; /close leaves, /help lists commands"
                    ));
                }
                let command = match command {
                    Ok(Command::OpenAndSend { to, body }) => Ok(Command::Send { to, body }),
                    other => other,
                };
                match command {
                    Ok(Command::Quit) => {
                        quit_typed = true;
                        break;
                    }
                    Ok(Command::Nothing | Command::Open(_) | Command::OpenAndSend { .. }) => {}
                    Ok(Command::Close) => match was_open {
                        Some(user) => out.line(format!("left the conversation with {user}")),
                        None => out.line("no conversation is open"),
                    },
                    Ok(Command::Chats) => {
                        out.line(render::chats_text(&chats.list(), &look, proto::now_ms()));
                    }
                    Ok(Command::Help) => out.line(command::HELP),
                    // Run beside the prompt, in the order typed (see `run_in_order`).
                    // Waits only if the worker is that far behind (back-pressure).
                    Ok(command) => { let _ = commands.send(command).await; }
                    Err(error) => out.line(error.to_string()),
                }
            }
        }
    }
    // Commands typed before quitting still run (a send behind a slow `whois` must reach
    // the outbox, not vanish), bounded so a server that does not answer cannot hold the
    // exit for long.
    drop(commands);
    if tokio::time::timeout(Duration::from_millis(100), &mut worker)
        .await
        .is_err()
    {
        out.line("finishing the commands already typed...");
        if tokio::time::timeout(QUIT_TIMEOUT, worker).await.is_err() {
            out.line(
                "gave up on commands still waiting for the server (sends already taken are in the outbox)",
            );
        }
    }
    out.line("bye");
    save_history(&history_path, &line_editor.history());
    if let Err(error) = chats.save(&chats_path) {
        tracing::warn!(%error, "cannot save the conversations' unread counts");
    }
    if !quit_typed {
        // The editor may be reading a line in raw mode (a signal, a fatal refusal).
        line_editor.restore_terminal();
    }
    if let Status::Fatal(reply) = &*client.status().borrow() {
        eprintln!("p2pchat ({}): {}", client.user(), render::fatal_text(reply));
    }
    Ok(code)
}

/// What one command did: whether it worked, a sentence for people, and (for `listen
/// --json`) fields for programs.
struct Outcome {
    ok: bool,
    text: String,
    fields: serde_json::Map<String, serde_json::Value>,
}

impl Outcome {
    fn done(text: String) -> Self {
        Self {
            ok: true,
            text,
            fields: serde_json::Map::new(),
        }
    }

    fn failed(text: String) -> Self {
        Self {
            ok: false,
            text,
            fields: serde_json::Map::new(),
        }
    }

    /// This outcome with the field `name` set to `value`.
    fn with(mut self, name: &str, value: serde_json::Value) -> Self {
        self.fields.insert(name.to_owned(), value);
        self
    }

    /// This outcome with every field of the object `fields` (anything else adds nothing).
    fn with_all(mut self, fields: serde_json::Value) -> Self {
        if let serde_json::Value::Object(fields) = fields {
            self.fields.extend(fields);
        }
        self
    }

    /// The JSON object `listen --json` prints for the command `line`.
    fn json(self, line: &str) -> serde_json::Value {
        let mut object = self.fields;
        object.insert("event".into(), "result".into());
        object.insert("command".into(), line.into());
        object.insert("ok".into(), self.ok.into());
        object.insert("text".into(), self.text.into());
        serde_json::Value::Object(object)
    }
}

/// `label: a, b, c`, or `empty` when there is nobody.
fn listing(users: &[Username], label: &str, empty: &str) -> String {
    if users.is_empty() {
        return empty.to_owned();
    }
    let names: Vec<&str> = users.iter().map(Username::as_str).collect();
    format!("{label}: {}", names.join(", "))
}

/// `online: a, b, c`, and how many more are online when the server listed only the first.
fn online_listing(online: &peer::OnlineUsers) -> String {
    let listed = listing(&online.users, "online", "nobody is online");
    match online.more {
        0 => listed,
        more => format!("{listed} (and {more} more online, not listed)"),
    }
}

/// What the user sees of a send's result.
fn send_outcome(
    to: &Username,
    result: Result<peer::SendReport, peer::ClientError>,
    look: &render::Look,
) -> Outcome {
    match result {
        Ok(report) => {
            let text = render::sent_text(to, &report.status, look);
            let outcome = if report.status.is_success() {
                Outcome::done(text)
            } else {
                Outcome::failed(text)
            };
            let mut fields = render::event_json(&Event::Delivery {
                id: report.id,
                to: report.to,
                status: report.status,
            });
            if let serde_json::Value::Object(fields) = &mut fields {
                fields.remove("event");
            }
            outcome.with_all(fields)
        }
        Err(error) => Outcome::failed(render::terminal_safe(&format!("not sent: {error}"))),
    }
}

/// Runs the interactive prompt's commands beside it, in the order they were typed: each
/// command is taken by the runtime before the next one is, so a pasted burst of `send`s
/// goes out (and into the history) in order. A send's wait for its result runs on its own,
/// in a task this function owns, so a slow delivery holds up neither the prompt nor the
/// commands after it; once the prompt has quit and every typed command has been taken,
/// results still awaited are not printed (the messages are in the outbox already).
async fn run_in_order(
    client: Client,
    mut commands: tokio::sync::mpsc::Receiver<Command>,
    out: editor::Screen,
    look: render::Look,
    names: editor::Names,
) {
    let print = |out: editor::Screen, outcome: Outcome| {
        if !outcome.text.is_empty() {
            out.line(outcome.text);
        }
    };
    let mut waiting_sends = tokio::task::JoinSet::new();
    loop {
        let command = tokio::select! {
            Some(_) = waiting_sends.join_next(), if !waiting_sends.is_empty() => continue,
            command = commands.recv() => match command {
                Some(command) => command,
                None => break,
            },
        };
        match command {
            Command::Send { to, body } => match client.submit_send(&to, &body).await {
                Ok(result) => {
                    let out = out.clone();
                    let look = look.clone();
                    waiting_sends
                        .spawn(async move { print(out, send_outcome(&to, result.await, &look)) });
                }
                Err(error) => print(out.clone(), send_outcome(&to, Err(error), &look)),
            },
            // The end of a mute is told by the runtime's event, with the held messages
            // right after it; the command's own "unmuted" line would land among them.
            Command::Unmute(user) => {
                let outcome = execute(&client, Command::Unmute(user), &look).await;
                if !outcome.ok {
                    print(out.clone(), outcome);
                }
            }
            Command::List => {
                let outcome = execute(&client, Command::List, &look).await;
                // Everyone listed can be completed from now on.
                if let Some(users) = outcome
                    .fields
                    .get("users")
                    .and_then(|users| users.as_array())
                {
                    for user in users.iter().filter_map(|user| user.as_str()) {
                        if let Ok(user) = Username::new(user) {
                            names.learn(&user);
                        }
                    }
                }
                print(out.clone(), outcome);
            }
            command => print(out.clone(), execute(&client, command, &look).await),
        }
    }
}

/// Runs one command against the runtime; interactive mode prints the text above the prompt,
/// `listen --json` prints the whole outcome as a `result` object, its fields structured.
async fn execute(client: &Client, command: Command, look: &render::Look) -> Outcome {
    let failed = |error: peer::ClientError, what: &str| {
        Outcome::failed(render::terminal_safe(&format!("{what} failed: {error}")))
    };
    let done = |result: Result<(), peer::ClientError>, what: &str, text: String| match result {
        Ok(()) => Outcome::done(text),
        Err(error) => failed(error, what),
    };
    match command {
        Command::Send { to, body } => send_outcome(&to, client.send(&to, &body).await, look),
        Command::List => match client.list().await {
            Ok(online) => {
                Outcome::done(online_listing(&online)).with_all(render::online_json(&online))
            }
            Err(error) => failed(error, "list"),
        },
        Command::Block(user) => done(
            client.block(&user).await,
            "block",
            format!("blocked {user}"),
        ),
        Command::Unblock(user) => done(
            client.unblock(&user).await,
            "unblock",
            format!("unblocked {user}"),
        ),
        Command::Blocked => match client.blocked().await {
            Ok(users) => Outcome::done(listing(&users, "blocked", "nobody is blocked"))
                .with_all(render::users_json(&users)),
            Err(error) => failed(error, "blocked"),
        },
        Command::Mute { user, seconds } => done(
            client.mute(&user, seconds).await.map(|_| ()),
            "mute",
            format!("muted {user} for {seconds} s (messages are kept and shown after)"),
        ),
        Command::Unmute(user) => done(
            client.unmute(&user).await,
            "unmute",
            format!("unmuted {user}"),
        ),
        Command::Whois(user) => match client.whois(&user).await {
            Ok(report) => Outcome::done(render::whois_text(&report, look, proto::now_ms()))
                .with_all(render::whois_json(&report)),
            Err(error) => failed(error, "whois"),
        },
        Command::Trust(user) => match client.trust(&user).await {
            Ok(fingerprint) => Outcome::done(format!("now trusting {user}'s key {fingerprint}"))
                .with("user", user.as_str().into())
                .with("fingerprint", fingerprint.into()),
            Err(error) => failed(error, "trust"),
        },
        Command::History { user, limit } => match client.history(&user, limit).await {
            Ok(lines) => {
                let now_ms = proto::now_ms();
                let text = if lines.is_empty() {
                    format!("no messages with {user} yet")
                } else {
                    lines
                        .iter()
                        .map(|entry| render::history_line(entry, look, now_ms))
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                Outcome::done(text).with_all(render::history_json(&user, &lines))
            }
            Err(error) => failed(error, "history"),
        },
        // Conversations belong to whoever reads the lines (the prompt, `listen`'s reader).
        Command::Nothing
        | Command::Help
        | Command::Quit
        | Command::Open(_)
        | Command::OpenAndSend { .. }
        | Command::Close
        | Command::Chats => Outcome::done(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_receipts_are_on_unless_the_flag_or_the_environment_turns_them_off() {
        assert!(read_receipts_on(false, None));
        assert!(read_receipts_on(false, Some("1")));
        assert!(!read_receipts_on(true, None));
        assert!(!read_receipts_on(true, Some("1")));
        for off in ["0", "false", "OFF", "no"] {
            assert!(!read_receipts_on(false, Some(off)), "{off}");
        }
    }

    #[test]
    fn a_capped_list_says_how_many_more_are_online() {
        let name = |text: &str| Username::new(text).unwrap();
        let online = |users: Vec<Username>, more| peer::OnlineUsers { users, more };
        assert_eq!(online_listing(&online(vec![], 0)), "nobody is online");
        assert_eq!(
            online_listing(&online(vec![name("alice"), name("bob")], 0)),
            "online: alice, bob"
        );
        assert_eq!(
            online_listing(&online(vec![name("alice")], 4321)),
            "online: alice (and 4321 more online, not listed)"
        );
    }

    #[test]
    fn only_messages_outside_the_open_conversation_ring_the_bell() {
        let (bob, carol) = (
            Username::new("bob").unwrap(),
            Username::new("carol").unwrap(),
        );
        assert!(!rings_bell(Some(&bob), &bob));
        assert!(rings_bell(Some(&bob), &carol));
        assert!(rings_bell(None, &bob));
    }
}
