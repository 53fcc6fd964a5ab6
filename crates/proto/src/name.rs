//! [`Username`]: a validated user name, the only form in which a name travels or is stored.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest name accepted, in bytes (and characters: names are ASCII).
pub const MAX_USERNAME_LEN: usize = 32;

/// A user name matching `[a-z0-9_-]{1,32}`.
///
/// The type cannot hold anything else: every constructor validates, including
/// deserialisation, so a name read off the wire or out of a store is already checked.
/// This is what keeps a name like `a;b` from ever reaching a list or a key.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Username(String);

/// Why a string is not a valid [`Username`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    /// The name is empty.
    #[error("a username cannot be empty")]
    Empty,
    /// The name is longer than [`MAX_USERNAME_LEN`].
    #[error("a username has at most {MAX_USERNAME_LEN} characters (got {0})")]
    TooLong(usize),
    /// The name contains a character outside `[a-z0-9_-]`.
    #[error("a username may only contain a-z, 0-9, '_' and '-' (found {0:?})")]
    BadChar(char),
}

impl Username {
    /// Validates `name` as is: upper case is refused, not folded, so the name a user
    /// sees is the name that is bound.
    pub fn new(name: &str) -> Result<Self, UsernameError> {
        if name.is_empty() {
            return Err(UsernameError::Empty);
        }
        if name.len() > MAX_USERNAME_LEN {
            return Err(UsernameError::TooLong(name.chars().count()));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
        {
            return Err(UsernameError::BadChar(bad));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Username {
    type Err = UsernameError;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::new(name)
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl AsRef<str> for Username {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for Username {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Username {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Username::new(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for name in ["a", "alice", "bob_2", "x-y", &"z".repeat(32)] {
            assert_eq!(Username::new(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn refuses_bad_names_with_the_reason() {
        assert_eq!(Username::new(""), Err(UsernameError::Empty));
        assert_eq!(
            Username::new(&"a".repeat(33)),
            Err(UsernameError::TooLong(33))
        );
        assert_eq!(Username::new("Alice"), Err(UsernameError::BadChar('A')));
        assert_eq!(Username::new("a;b"), Err(UsernameError::BadChar(';')));
        assert_eq!(Username::new("a b"), Err(UsernameError::BadChar(' ')));
        assert_eq!(Username::new("é"), Err(UsernameError::BadChar('é')));
    }

    #[test]
    fn deserialising_validates() {
        let bad = postcard::to_stdvec("a;b").unwrap();
        assert!(postcard::from_bytes::<Username>(&bad).is_err());
        let good = postcard::to_stdvec("bob").unwrap();
        assert_eq!(
            postcard::from_bytes::<Username>(&good).unwrap().as_str(),
            "bob"
        );
    }
}
