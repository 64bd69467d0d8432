//! C2SP signed notes (Ed25519) and tlog checkpoints. Key encodings follow the signed-note
//! spec: `PRIVATE+KEY+<name>+<hex id>+<base64(0x01 ‖ seed)>` and
//! `<name>+<hex id>+<base64(0x01 ‖ public key)>`, id = first 4 bytes of
//! SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key).

use base64::{Engine, engine::general_purpose::STANDARD};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

use crate::merkle::Hash;

const ALG_ED25519: u8 = 0x01;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed key: {0}")]
    BadKey(&'static str),
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    #[error("no valid signature by {0}")]
    NoSignature(String),
    #[error("malformed checkpoint: {0}")]
    BadCheckpoint(&'static str),
}

fn key_id(name: &str, public: &[u8]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ALG_ED25519]);
    h.update(public);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['+', ' ', '\n']) && !name.chars().any(char::is_whitespace)
}

/// The default signing key name (= the default checkpoint origin, `civgate.local/audit`).
pub const DEFAULT_KEY_NAME: &str = "civgate.local/audit";

/// A signer: the log's Ed25519 key and its name.
pub struct Signer {
    name: String,
    id: u32,
    key: Ed25519KeyPair,
    seed: [u8; 32],
}

impl Signer {
    pub(crate) fn from_seed(name: &str, seed: [u8; 32]) -> Result<Self, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::BadKey(
                "name must be non-empty without '+' or spaces",
            ));
        }
        let key =
            Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| NoteError::BadKey("seed"))?;
        let id = key_id(name, key.public_key().as_ref());
        Ok(Self {
            name: name.to_owned(),
            id,
            key,
            seed,
        })
    }

    /// A fresh key from the system's random number generator.
    pub fn generate(name: &str) -> Result<Self, NoteError> {
        use ring::rand::{SecureRandom, SystemRandom};
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| NoteError::BadKey("random number generator failed"))?;
        Self::from_seed(name, seed)
    }

    /// Parses `PRIVATE+KEY+<name>+<hex id>+<base64>`.
    pub fn parse(s: &str) -> Result<Self, NoteError> {
        let rest = s
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::BadKey("expected PRIVATE+KEY+ prefix"))?;
        // The base64 key itself may contain '+'.
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(b64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(NoteError::BadKey("expected PRIVATE+KEY+name+id+key"));
        };
        let raw = STANDARD
            .decode(b64)
            .map_err(|_| NoteError::BadKey("base64"))?;
        let (Some(&ALG_ED25519), Ok(seed)) =
            (raw.first(), <[u8; 32]>::try_from(&raw[1.min(raw.len())..]))
        else {
            return Err(NoteError::BadKey("not an Ed25519 key"));
        };
        let signer = Self::from_seed(name, seed)?;
        if format!("{:08x}", signer.id) != id_hex {
            return Err(NoteError::BadKey("key id does not match the key"));
        }
        Ok(signer)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `PRIVATE+KEY+…`, for the key file.
    pub fn private_key_string(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(&self.seed);
        format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.id,
            STANDARD.encode(raw)
        )
    }

    /// `<name>+<hex id>+<base64>`: what verifiers are given.
    pub fn verifier_key_string(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.public_key().as_ref());
        format!("{}+{:08x}+{}", self.name, self.id, STANDARD.encode(raw))
    }

    /// Signs `text` (which must end in a newline) into a signed note.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        if !text.ends_with('\n') {
            return Err(NoteError::Malformed("text must end with a newline"));
        }
        let sig = self.key.sign(text.as_bytes());
        let mut blob = self.id.to_be_bytes().to_vec();
        blob.extend_from_slice(sig.as_ref());
        Ok(format!(
            "{text}\n\u{2014} {} {}\n",
            self.name,
            STANDARD.encode(blob)
        ))
    }
}

/// A verifier key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    name: String,
    id: u32,
    public: [u8; 32],
}

impl Verifier {
    pub fn parse(s: &str) -> Result<Self, NoteError> {
        let mut parts = s.trim().splitn(3, '+');
        let (Some(name), Some(id_hex), Some(b64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(NoteError::BadKey("expected name+id+key"));
        };
        if !valid_name(name) {
            return Err(NoteError::BadKey("name"));
        }
        let raw = STANDARD
            .decode(b64)
            .map_err(|_| NoteError::BadKey("base64"))?;
        let (Some(&ALG_ED25519), Ok(public)) =
            (raw.first(), <[u8; 32]>::try_from(&raw[1.min(raw.len())..]))
        else {
            return Err(NoteError::BadKey("not an Ed25519 key"));
        };
        let id = key_id(name, &public);
        if format!("{id:08x}") != id_hex {
            return Err(NoteError::BadKey("key id does not match the key"));
        }
        Ok(Self {
            name: name.to_owned(),
            id,
            public,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks a signed note and returns its text. Signatures by other keys are ignored;
    /// at least one valid signature by this key is required.
    pub fn open<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        let split = note
            .rfind("\n\n")
            .ok_or(NoteError::Malformed("no blank line before signatures"))?;
        let text = &note[..=split];
        let sigs = &note[split + 2..];
        if !sigs.ends_with('\n') {
            return Err(NoteError::Malformed(
                "signature block must end with a newline",
            ));
        }
        for line in sigs.lines() {
            let rest = line.strip_prefix("\u{2014} ").ok_or(NoteError::Malformed(
                "signature line must start with an em dash",
            ))?;
            let (name, b64) = rest
                .split_once(' ')
                .ok_or(NoteError::Malformed("signature line"))?;
            let blob = STANDARD
                .decode(b64)
                .map_err(|_| NoteError::Malformed("signature base64"))?;
            if name != self.name || blob.len() != 68 || blob[..4] != self.id.to_be_bytes() {
                continue;
            }
            if UnparsedPublicKey::new(&ED25519, &self.public)
                .verify(text.as_bytes(), &blob[4..])
                .is_ok()
            {
                return Ok(text);
            }
        }
        Err(NoteError::NoSignature(self.name.clone()))
    }
}

/// A C2SP tlog checkpoint body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    pub fn to_text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        )
    }

    /// Parses the text of a checkpoint (extension lines after the root are allowed).
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let mut lines = text.split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or(NoteError::BadCheckpoint("origin"))?;
        let size = lines
            .next()
            .and_then(|s| (!(s.starts_with('+') || s.len() > 1 && s.starts_with('0'))).then_some(s))
            .and_then(|s| s.parse().ok())
            .ok_or(NoteError::BadCheckpoint("size"))?;
        let root = lines
            .next()
            .and_then(|r| STANDARD.decode(r).ok())
            .and_then(|r| <Hash>::try_from(r).ok())
            .ok_or(NoteError::BadCheckpoint("root hash"))?;
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/signed-note")
                .join(name),
        )
        .unwrap()
    }

    const SIGNER: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const VERIFIER: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";

    #[test]
    fn signed_note_vector_reproduces_byte_for_byte() {
        let signer = Signer::parse(SIGNER).unwrap();
        assert_eq!(signer.verifier_key_string(), VERIFIER);
        assert_eq!(signer.private_key_string(), SIGNER);
        let signed = signer.sign(&fixture("note.txt")).unwrap();
        assert_eq!(signed, fixture("signed.txt"));
    }

    #[test]
    fn verifier_accepts_the_vector_and_ignores_other_signers() {
        let v = Verifier::parse(VERIFIER).unwrap();
        let signed = fixture("signed.txt");
        assert_eq!(v.open(&signed).unwrap(), fixture("note.txt"));
        let with_second = format!(
            "{signed}\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
        );
        assert!(v.open(&with_second).is_ok());
        let enoch =
            Verifier::parse("EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop")
                .unwrap();
        assert!(enoch.open(&with_second).is_ok());
        assert!(enoch.open(&signed).is_err());
    }

    #[test]
    fn edited_text_or_signature_is_refused() {
        let v = Verifier::parse(VERIFIER).unwrap();
        let signed = fixture("signed.txt");
        assert!(
            v.open(&signed.replacen("cryptography", "cryptographY", 1))
                .is_err()
        );
        let mut bytes = signed.into_bytes();
        let n = bytes.len();
        bytes[n - 5] ^= 1;
        assert!(v.open(&String::from_utf8(bytes).unwrap()).is_err());
    }

    #[test]
    fn checkpoint_round_trips_and_is_signed() {
        let s = Signer::generate("civgate.test/log").unwrap();
        let cp = Checkpoint {
            origin: "civgate.test/log".into(),
            size: 42,
            root: [9; 32],
        };
        let note = s.sign(&cp.to_text()).unwrap();
        let v = Verifier::parse(&s.verifier_key_string()).unwrap();
        assert_eq!(Checkpoint::parse(v.open(&note).unwrap()).unwrap(), cp);
        assert!(Checkpoint::parse("o\n012\nAAAA\n").is_err());
        assert!(Checkpoint::parse("o\n12\nnot base64\n").is_err());
    }

    #[test]
    fn keys_with_wrong_ids_are_refused() {
        assert!(
            Verifier::parse("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
                .is_err()
        );
        assert!(
            Signer::parse(
                "PRIVATE+KEY+PeterNeumann+00000000+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
            )
            .is_err()
        );
    }
}
