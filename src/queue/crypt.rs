//! Encryption at rest of what a stored job carries from the client and the upstream: the
//! request URI, headers and body, and the last response's headers and body prefix.
//!
//! Each record is sealed with XChaCha20-Poly1305 under the primary key, with a fresh random
//! 24-byte nonce (large enough that random nonces never repeat in practice) and the job id as
//! associated data, so a sealed part moved to another job's record fails to open. The key id
//! is stored in clear beside the ciphertext, so records sealed with an older key still open
//! while it is listed: rotation is "add a key, make it primary, keep the old one listed until
//! the jobs sealed with it are gone". The record layout is in `redb/schema.rs`.
//!
//! Keys are 32 bytes, written as 64 hex digits or as base64 (standard alphabet, padding
//! optional); whitespace around them (a file's trailing newline) is ignored. Key material is
//! zeroed when dropped and never appears in an error message.

use std::path::PathBuf;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::config::{EncryptionConfig, KeyFrom};

/// Key length in bytes.
pub const KEY_LEN: usize = 32;
/// Nonce length in bytes (XChaCha20).
pub const NONCE_LEN: usize = 24;
/// Authentication tag length in bytes.
pub const TAG_LEN: usize = 16;

/// A key that could not be loaded. Messages name the key id and where it was read from,
/// never the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("encryption key {id:?}: cannot read {path}: {source}")]
    Read {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encryption key {id:?}: environment variable {var} is not set")]
    EnvMissing { id: String, var: String },
    #[error("encryption key {id:?} (from {from}): {problem}; expected 32 bytes written as 64 hex digits or as base64 (e.g. `openssl rand -hex 32`)")]
    Format {
        id: String,
        from: String,
        problem: String,
    },
    #[error("encryption key {id:?} is listed twice")]
    Duplicate { id: String },
    #[error("the primary encryption key {id:?} is not among the keys")]
    NoPrimary { id: String },
}

/// Why a sealed part did not open; the message names the key id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("sealed with encryption key {key_id:?}, but storage.encryption is not configured")]
    NotConfigured { key_id: String },
    #[error("sealed with encryption key {key_id:?}, which is not in storage.encryption.keys")]
    MissingKey { key_id: String },
    #[error("cannot be decrypted with encryption key {key_id:?}: the key is not the one it was sealed with, or the record was altered")]
    Unauthentic { key_id: String },
}

struct Key {
    id: String,
    // Zeroes its key on drop (the crate's `zeroize` feature).
    cipher: XChaCha20Poly1305,
    /// For [`Sealer::peek_in_place`] only.
    raw: Zeroizing<[u8; KEY_LEN]>,
}

/// The configured keys; seals with the primary, opens with any.
pub struct Sealer {
    keys: Vec<Key>,
    primary: usize,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("Sealer")
            .field("keys", &ids)
            .field("primary", &self.primary_id())
            .finish()
    }
}

/// Base64 with or without padding: both are common outputs of key tools.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes a key written as 64 hex digits or base64. Errors describe the text by its length
/// only.
pub fn parse_key(text: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    let text = text.trim();
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if text.is_empty() {
        return Err("the key is empty".into());
    }
    if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode_to_slice(text, &mut key[..]).map_err(|_| "not valid hex".to_string())?;
        return Ok(key);
    }
    // Room for a longer decoding, so a wrong length is reported as such.
    let mut buf = Zeroizing::new([0u8; 3 * KEY_LEN]);
    let decoded = B64.decode_slice(text, &mut buf[..]);
    if !matches!(decoded, Ok(KEY_LEN)) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{} hex digits", text.len()));
    }
    match decoded {
        Ok(n) if n == KEY_LEN => {
            key.copy_from_slice(&buf[..KEY_LEN]);
            Ok(key)
        }
        Ok(n) => Err(format!("it decodes to {n} bytes as base64")),
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
            Err("it decodes to more than 32 bytes as base64".into())
        }
        Err(_) => Err(format!(
            "{} characters that are neither 64 hex digits nor base64",
            text.chars().count()
        )),
    }
}

impl Sealer {
    /// Reads every key of `storage.encryption` (files, environment variables).
    pub fn load(config: &EncryptionConfig) -> Result<Self, KeyError> {
        let mut keys = Vec::with_capacity(config.keys.len());
        for k in &config.keys {
            let (text, from) = match &k.from {
                KeyFrom::File(path) => {
                    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                        id: k.id.clone(),
                        path: path.clone(),
                        source,
                    })?;
                    (Zeroizing::new(text), format!("file {}", path.display()))
                }
                KeyFrom::Env(var) => {
                    let text = std::env::var(var).map_err(|_| KeyError::EnvMissing {
                        id: k.id.clone(),
                        var: var.clone(),
                    })?;
                    (Zeroizing::new(text), format!("environment variable {var}"))
                }
            };
            let key = parse_key(&text).map_err(|problem| KeyError::Format {
                id: k.id.clone(),
                from,
                problem,
            })?;
            keys.push((k.id.clone(), key));
        }
        Self::from_keys(keys, &config.primary)
    }

    /// A sealer from keys already in memory.
    pub fn from_keys(
        keys: Vec<(String, Zeroizing<[u8; KEY_LEN]>)>,
        primary: &str,
    ) -> Result<Self, KeyError> {
        let mut out: Vec<Key> = Vec::with_capacity(keys.len());
        for (id, key) in keys {
            if out.iter().any(|k| k.id == id) {
                return Err(KeyError::Duplicate { id });
            }
            let cipher = XChaCha20Poly1305::new(&(*key).into());
            out.push(Key {
                id,
                cipher,
                raw: key,
            });
        }
        let primary =
            out.iter()
                .position(|k| k.id == primary)
                .ok_or_else(|| KeyError::NoPrimary {
                    id: primary.to_owned(),
                })?;
        Ok(Self { keys: out, primary })
    }

    /// The id new records are sealed with.
    pub fn primary_id(&self) -> &str {
        self.keys.get(self.primary).map_or("", |k| k.id.as_str())
    }

    /// Every configured key id.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    /// A fresh random nonce for one record.
    pub fn nonce() -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        // ThreadRng is a CSPRNG seeded from the OS and reseeded periodically.
        rand::rng().fill_bytes(&mut n);
        n
    }

    /// Encrypts `buf` in place with the primary key; returns the tag to store after it.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        associated: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], String> {
        let key = self.keys.get(self.primary).ok_or("no primary key")?;
        let tag = key
            .cipher
            .encrypt_inout_detached(&XNonce::from(*nonce), associated, buf.into())
            .map_err(|_| "encryption failed (record too large)".to_string())?;
        Ok(tag.into())
    }

    /// Decrypts `buf` in place with the key `key_id` WITHOUT checking the tag: the sealed
    /// part's length is not stored, and a raw scan of a damaged file learns where it ends by
    /// parsing the decrypted prefix. Nothing read this way is trusted: the record is then
    /// opened with [`Sealer::open_in_place`], which checks the tag.
    pub fn peek_in_place(
        &self,
        key_id: &str,
        nonce: &[u8; NONCE_LEN],
        buf: &mut [u8],
    ) -> Result<(), OpenError> {
        use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
        let key = self.key(key_id)?;
        let mut stream = chacha20::XChaCha20::new(&(*key.raw).into(), &(*nonce).into());
        // The AEAD spends the first keystream block on the Poly1305 key (RFC 8439 2.8).
        stream.seek(64u64);
        stream.apply_keystream(buf);
        Ok(())
    }

    fn key(&self, key_id: &str) -> Result<&Key, OpenError> {
        self.keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or_else(|| OpenError::MissingKey {
                key_id: key_id.to_owned(),
            })
    }

    /// Decrypts `buf` in place with the key `key_id`, checking `tag` and `associated`.
    pub fn open_in_place(
        &self,
        key_id: &str,
        nonce: &[u8; NONCE_LEN],
        associated: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), OpenError> {
        self.key(key_id)?
            .cipher
            .decrypt_inout_detached(
                &XNonce::from(*nonce),
                associated,
                buf.into(),
                &Tag::from(*tag),
            )
            .map_err(|_| OpenError::Unauthentic {
                key_id: key_id.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeySource;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn keys_parse_from_hex_and_base64() {
        let want: Vec<u8> = (0..32).collect();
        assert_eq!(&parse_key(HEX).unwrap()[..], &want[..]);
        assert_eq!(&parse_key(&format!("  {HEX}\n")).unwrap()[..], &want[..]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&want);
        assert_eq!(&parse_key(&b64).unwrap()[..], &want[..]);
        assert_eq!(
            &parse_key(b64.trim_end_matches('=')).unwrap()[..],
            &want[..]
        );
    }

    #[test]
    fn bad_keys_are_described_without_their_content() {
        for (text, hint) in [
            ("", "empty"),
            ("00ff", "4 hex digits"),
            (&"ab".repeat(33), "66 hex digits"),
            ("QUJD", "decodes to 3 bytes"),
            (&"QUJD".repeat(20), "decodes to 60 bytes"),
            (&"QUJD".repeat(40), "more than 32 bytes"),
            ("secret-password!", "neither 64 hex digits nor base64"),
        ] {
            let e = parse_key(text).unwrap_err();
            assert!(e.contains(hint), "{text:?}: {e}");
            if text.len() > 4 {
                assert!(!e.contains(text), "the key leaks into {e:?}");
            }
        }
    }

    #[test]
    fn load_reads_files_and_env_and_names_the_key_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k2");
        std::fs::write(&file, format!("{HEX}\n")).unwrap();
        std::env::set_var("SPILLWAY_TEST_CRYPT_K1", HEX);
        let cfg = EncryptionConfig {
            keys: vec![
                KeySource {
                    id: "k2".into(),
                    from: KeyFrom::File(file.clone()),
                },
                KeySource {
                    id: "k1".into(),
                    from: KeyFrom::Env("SPILLWAY_TEST_CRYPT_K1".into()),
                },
            ],
            primary: "k2".into(),
        };
        let s = Sealer::load(&cfg).unwrap();
        assert_eq!(s.primary_id(), "k2");
        assert_eq!(s.key_ids().collect::<Vec<_>>(), ["k2", "k1"]);
        assert!(!format!("{s:?}").contains("0102"));

        let missing = EncryptionConfig {
            keys: vec![KeySource {
                id: "k9".into(),
                from: KeyFrom::Env("SPILLWAY_TEST_CRYPT_UNSET".into()),
            }],
            primary: "k9".into(),
        };
        let e = Sealer::load(&missing).unwrap_err().to_string();
        assert!(
            e.contains("\"k9\"") && e.contains("SPILLWAY_TEST_CRYPT_UNSET"),
            "{e}"
        );

        std::fs::write(&file, "hunter2-is-not-a-key").unwrap();
        let e = Sealer::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("\"k2\"") && e.contains("file"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn seal_then_open_and_detect_changes() {
        let key = parse_key(HEX).unwrap();
        let s = Sealer::from_keys(vec![("k".into(), key)], "k").unwrap();
        let nonce = Sealer::nonce();
        let mut buf = b"secret body".to_vec();
        let tag = s.seal_in_place(&nonce, b"id-1", &mut buf).unwrap();
        assert_ne!(&buf[..], b"secret body");
        let sealed = buf.clone();
        s.open_in_place("k", &nonce, b"id-1", &mut buf, &tag)
            .unwrap();
        assert_eq!(&buf[..], b"secret body");

        let mut other = sealed.clone();
        let e = s
            .open_in_place("k", &nonce, b"id-2", &mut other, &tag)
            .unwrap_err();
        assert!(matches!(e, OpenError::Unauthentic { .. }));
        let e = s
            .open_in_place("old", &nonce, b"id-1", &mut sealed.clone(), &tag)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "sealed with encryption key \"old\", which is not in storage.encryption.keys"
        );
        assert_ne!(Sealer::nonce(), Sealer::nonce());
    }
}
