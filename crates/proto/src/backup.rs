//! The passphrase-protected identity backup: what `p2pchat identity export` writes and
//! `import` reads.
//!
//! A backup is three lines of text:
//!
//! ```text
//! p2pchat identity backup v1
//! scrypt log_n=17 r=8 p=1 salt=<16 random bytes, URL-safe base64>
//! <Fernet token>
//! ```
//!
//! The second line is the key derivation's header: scrypt (a memory-hard KDF, through the
//! `scrypt` crate) turns the passphrase and the salt into a 32-byte Fernet key, with the
//! parameters written there so later backups can raise them and older ones still open. The
//! token (the `fernet` crate: AES-128-CBC + HMAC-SHA256) holds [`BackupContents`] in
//! [`crate::wire`] encoding. No cipher is written here: scrypt and Fernet are the crates'.
//!
//! Opening checks the shape first, so a truncated or corrupt file is told apart from a
//! wrong passphrase (whose token does not authenticate); every failure is a
//! [`BackupError`], never a panic, and parameters beyond [`MAX_LOG_N`] / [`MAX_R`] /
//! [`MAX_P`] are refused before any work, so a crafted file cannot make the import run
//! for hours or allocate gigabytes.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{
    identity::{PublicKeys, SECRET_FILE_LEN},
    name::Username,
    wire,
};

/// The first line of every backup file.
pub const MAGIC: &str = "p2pchat identity backup v1";
/// scrypt's work factor for new backups: N = 2^17 with r = 8 takes 128 MiB and about half
/// a second per guess (the OWASP recommendation, and `scrypt::Params::RECOMMENDED`).
pub const LOG_N: u8 = 17;
/// scrypt's block size for new backups.
pub const R: u32 = 8;
/// scrypt's parallelism for new backups.
pub const P: u32 = 1;
/// The largest work factor an import accepts (2^22 × 8 × 128 bytes = 4 GiB would be
/// refused: this bounds memory at 1 GiB with r = 8).
pub const MAX_LOG_N: u8 = 20;
/// The largest block size an import accepts.
pub const MAX_R: u32 = 16;
/// The largest parallelism an import accepts.
pub const MAX_P: u32 = 4;
const SALT_LEN: usize = 16;

/// What a backup holds: enough to be the same user on a fresh machine.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupContents {
    /// The name the identity is registered under.
    pub user: Username,
    /// The identity file's bytes ([`crate::Identity::secret_bytes`]); zeroized on drop.
    pub secret: Vec<u8>,
    /// The contacts' keys pinned by this user (trust on first use), so a restored client
    /// does not trust whatever keys the server offers next.
    pub pins: Vec<(Username, PublicKeys)>,
}

impl std::fmt::Debug for BackupContents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupContents")
            .field("user", &self.user)
            .field("pins", &self.pins.len())
            .finish_non_exhaustive()
    }
}

impl Drop for BackupContents {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

impl BackupContents {
    /// The identity file's bytes, checked to be an identity's length.
    pub fn secret_seeds(&self) -> Result<&[u8; SECRET_FILE_LEN], BackupError> {
        self.secret
            .as_slice()
            .try_into()
            .map_err(|_| BackupError::Corrupt("the identity in it has the wrong length"))
    }
}

/// The scrypt parameters of one backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// log₂ of scrypt's N.
    pub log_n: u8,
    /// scrypt's r.
    pub r: u32,
    /// scrypt's p.
    pub p: u32,
}

impl KdfParams {
    /// Parameters far too cheap for a real backup (N = 16), for tests that check the
    /// format and not the cost; an import accepts them, since the file says which were used.
    pub const fn cheap_for_tests() -> Self {
        Self {
            log_n: 4,
            r: R,
            p: P,
        }
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        Self {
            log_n: LOG_N,
            r: R,
            p: P,
        }
    }
}

/// Why a backup could not be made or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackupError {
    /// The file is not a backup, is cut short or was damaged.
    #[error("not a valid identity backup ({0})")]
    Corrupt(&'static str),
    /// The file says it is another version of the format.
    #[error("this backup's format is {0:?}, which this version of p2pchat does not read")]
    UnknownFormat(String),
    /// The KDF parameters are out of the accepted range.
    #[error(
        "the backup asks for scrypt parameters beyond what is accepted (log_n ≤ {MAX_LOG_N}, r ≤ {MAX_R}, p ≤ {MAX_P})"
    )]
    UnsafeParameters,
    /// The token does not authenticate under the key from this passphrase.
    #[error("wrong passphrase (or the backup was altered): nothing was imported")]
    WrongPassphrase,
    /// An empty passphrase.
    #[error("the passphrase is empty")]
    EmptyPassphrase,
}

/// Seals `contents` under `passphrase`, with a fresh random salt: the backup file's text.
pub fn seal(
    contents: &BackupContents,
    passphrase: &str,
    params: KdfParams,
) -> Result<String, BackupError> {
    if passphrase.is_empty() {
        return Err(BackupError::EmptyPassphrase);
    }
    let salt: [u8; SALT_LEN] = crate::random_bytes();
    let fernet = fernet_for(passphrase, &salt, params)?;
    let plaintext = Zeroizing::new(
        wire::encode(contents)
            .map_err(|_| BackupError::Corrupt("the contents do not encode"))?
            .to_vec(),
    );
    let token = fernet.encrypt(&plaintext);
    Ok(format!(
        "{MAGIC}\nscrypt log_n={} r={} p={} salt={}\n{token}\n",
        params.log_n,
        params.r,
        params.p,
        URL_SAFE_NO_PAD.encode(salt)
    ))
}

/// Opens a backup file's `text` with `passphrase`.
pub fn open(text: &str, passphrase: &str) -> Result<BackupContents, BackupError> {
    let (params, salt, token) = parse(text)?;
    let fernet = fernet_for(passphrase, &salt, params)?;
    // The token's own time is irrelevant to a backup (a machine with a clock behind the
    // exporting one must still open it): decrypt as of a time far ahead, with no TTL.
    let plaintext = Zeroizing::new(
        fernet
            .decrypt_at_time(token, None, u64::MAX / 2)
            .map_err(|_| BackupError::WrongPassphrase)?,
    );
    let contents: BackupContents = wire::decode(&plaintext)
        .map_err(|_| BackupError::Corrupt("the sealed contents do not decode"))?;
    contents.secret_seeds()?;
    Ok(contents)
}

/// Splits a backup into its KDF parameters, salt and token, checking each one's shape.
fn parse(text: &str) -> Result<(KdfParams, Vec<u8>, &str), BackupError> {
    let mut lines = text.lines();
    match lines.next() {
        Some(MAGIC) => {}
        Some(line)
            if line
                .strip_prefix("p2pchat identity backup v")
                .is_some_and(|version| {
                    !version.is_empty() && version.bytes().all(|byte| byte.is_ascii_digit())
                }) =>
        {
            return Err(BackupError::UnknownFormat(line.to_owned()));
        }
        _ => {
            return Err(BackupError::Corrupt(
                "it does not start with the backup header",
            ));
        }
    }
    let header = lines
        .next()
        .ok_or(BackupError::Corrupt("the key derivation line is missing"))?;
    let mut fields = header.split(' ');
    if fields.next() != Some("scrypt") {
        return Err(BackupError::Corrupt("the key derivation is not scrypt"));
    }
    let mut field = |name: &str| -> Result<&str, BackupError> {
        fields
            .next()
            .and_then(|field| field.strip_prefix(name))
            .and_then(|field| field.strip_prefix('='))
            .ok_or(BackupError::Corrupt("the key derivation line is malformed"))
    };
    let number = |text: &str| {
        text.parse::<u32>()
            .map_err(|_| BackupError::Corrupt("a key derivation parameter is not a number"))
    };
    let log_n =
        u8::try_from(number(field("log_n")?)?).map_err(|_| BackupError::UnsafeParameters)?;
    let r = number(field("r")?)?;
    let p = number(field("p")?)?;
    let salt = URL_SAFE_NO_PAD
        .decode(field("salt")?)
        .map_err(|_| BackupError::Corrupt("the salt is not base64"))?;
    if salt.len() != SALT_LEN {
        return Err(BackupError::Corrupt("the salt has the wrong length"));
    }
    let token = lines
        .next()
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or(BackupError::Corrupt("the sealed identity is missing"))?;
    check_token_shape(token)?;
    Ok((KdfParams { log_n, r, p }, salt, token))
}

/// A Fernet token is URL-safe base64 of: version 0x80, 8-byte time, 16-byte IV, whole AES
/// blocks, 32-byte HMAC. A token of another shape was cut short or damaged, which is not
/// the same as a wrong passphrase.
fn check_token_shape(token: &str) -> Result<(), BackupError> {
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .map_err(|_| BackupError::Corrupt("the sealed identity is not base64 (cut short?)"))?;
    let blocks = bytes.len().checked_sub(1 + 8 + 16 + 32);
    match (bytes.first(), blocks) {
        (Some(0x80), Some(blocks)) if blocks > 0 && blocks % 16 == 0 => Ok(()),
        _ => Err(BackupError::Corrupt(
            "the sealed identity has the wrong length (cut short?)",
        )),
    }
}

/// The Fernet key scrypt derives from `passphrase` and `salt` with `params`.
fn fernet_for(
    passphrase: &str,
    salt: &[u8],
    params: KdfParams,
) -> Result<fernet::Fernet, BackupError> {
    if passphrase.is_empty() {
        return Err(BackupError::EmptyPassphrase);
    }
    if params.log_n > MAX_LOG_N || params.r > MAX_R || params.p > MAX_P {
        return Err(BackupError::UnsafeParameters);
    }
    let scrypt_params = scrypt::Params::new(params.log_n, params.r, params.p)
        .map_err(|_| BackupError::UnsafeParameters)?;
    let mut key = Zeroizing::new([0u8; 32]);
    scrypt::scrypt(
        passphrase.as_bytes(),
        salt,
        &scrypt_params,
        key.as_mut_slice(),
    )
    .map_err(|_| BackupError::UnsafeParameters)?;
    let encoded = Zeroizing::new(base64::engine::general_purpose::URL_SAFE.encode(key.as_slice()));
    fernet::Fernet::new(&encoded).ok_or(BackupError::Corrupt("the derived key is unusable"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    /// Cheap parameters: the tests check the format, not the cost.
    const FAST: KdfParams = KdfParams::cheap_for_tests();

    fn contents() -> BackupContents {
        let identity = Identity::generate();
        BackupContents {
            user: Username::new("alice").unwrap(),
            secret: identity.secret_bytes().to_vec(),
            pins: vec![(
                Username::new("bob").unwrap(),
                Identity::generate().public().clone(),
            )],
        }
    }

    #[test]
    fn a_backup_opens_with_its_passphrase_only() {
        let contents = contents();
        let text = seal(&contents, "correct horse", FAST).unwrap();
        assert!(text.starts_with(MAGIC));
        assert!(text.contains("scrypt log_n=4 r=8 p=1 salt="));
        assert_eq!(open(&text, "correct horse").unwrap(), contents);
        assert_eq!(
            open(&text, "wrong horse").unwrap_err(),
            BackupError::WrongPassphrase
        );
        // A fresh salt each time: two backups of the same contents differ.
        assert_ne!(text, seal(&contents, "correct horse", FAST).unwrap());
    }

    #[test]
    fn truncated_or_corrupt_files_are_clear_errors_not_panics() {
        let text = seal(&contents(), "pass", FAST).unwrap();
        // Every cut short of the whole token fails; most are told as damage, and a cut
        // that happens to leave a token of a valid shape fails to authenticate.
        let token_end = text.trim_end().len();
        for cut in 0..token_end {
            let result = open(&text[..cut], "pass");
            assert!(
                matches!(
                    result,
                    Err(BackupError::Corrupt(_) | BackupError::WrongPassphrase)
                ),
                "cut at {cut}: {result:?}"
            );
        }
        let header_end = text.len() - text.lines().last().unwrap().len() - 1;
        assert!(matches!(
            open(&text[..header_end + 10], "pass"),
            Err(BackupError::Corrupt(_))
        ));
        let flipped = text.replacen("log_n=4", "log_n=5", 1);
        assert_eq!(open(&flipped, "pass"), Err(BackupError::WrongPassphrase));
        let greedy = text.replacen("log_n=4", "log_n=40", 1);
        assert_eq!(open(&greedy, "pass"), Err(BackupError::UnsafeParameters));
        let newer = text.replacen(MAGIC, "p2pchat identity backup v9", 1);
        assert!(matches!(
            open(&newer, "pass"),
            Err(BackupError::UnknownFormat(_))
        ));
        assert!(matches!(
            open("hello\n", "pass"),
            Err(BackupError::Corrupt(_))
        ));
        assert_eq!(
            seal(&contents(), "", FAST).unwrap_err(),
            BackupError::EmptyPassphrase
        );
    }
}
