//! API key generation, hashing and masking.
//!
//! Keys are `sk-` followed by 48 characters from a CSPRNG. Only the SHA-256 of a key is stored; a
//! lookup hashes the presented key and looks the hash up.

use sha2::{Digest, Sha256};

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
pub const KEY_PREFIX: &str = "sk-";
pub const KEY_RANDOM_LEN: usize = 48;

/// A new random key, `sk-` + 48 alphanumerics. Fails only if the OS has no entropy source.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut raw = [0u8; KEY_RANDOM_LEN * 2];
    getrandom::fill(&mut raw)?;
    let mut key = String::with_capacity(KEY_PREFIX.len() + KEY_RANDOM_LEN);
    key.push_str(KEY_PREFIX);
    // Rejection sampling keeps the distribution uniform over the 62-letter alphabet.
    let mut bytes = raw.iter();
    while key.len() < KEY_PREFIX.len() + KEY_RANDOM_LEN {
        let b = match bytes.next() {
            Some(b) => *b,
            None => {
                let mut more = [0u8; 1];
                getrandom::fill(&mut more)?;
                more[0]
            }
        };
        if (b as usize) < ALPHABET.len() * 4 {
            key.push(ALPHABET[b as usize % ALPHABET.len()] as char);
        }
    }
    Ok(key)
}

/// Hex SHA-256 of a key, as stored.
pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A display form that identifies a key without revealing it: `sk-abcd****wxyz`.
pub fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 12 {
        return "****".to_string();
    }
    let head: String = chars[..7].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}****{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_prefix_length_and_alphabet() {
        let k = generate().unwrap();
        assert!(k.starts_with("sk-"));
        assert_eq!(k.len(), 51);
        assert!(k[3..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(k, generate().unwrap());
    }

    #[test]
    fn hash_is_stable_hex_sha256() {
        assert_eq!(hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn mask_hides_the_middle() {
        let k = "sk-abcdefghijklmnopqrstuvwxyz";
        assert_eq!(mask(k), "sk-abcd****wxyz");
        assert_eq!(mask("short"), "****");
    }
}
