//! TOTP (RFC 6238): HMAC-SHA1, 30-second steps, 6 digits — what every
//! authenticator app speaks. A code is accepted for the current step and
//! one step either side (clock drift), and never twice (the last accepted
//! step is stored).

use aws_lc_rs::{hmac, rand::SecureRandom};

/// Step length, in seconds.
pub const STEP: i64 = 30;
const DIGITS: u32 = 6;

/// A new 160-bit secret.
pub fn new_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 20];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut secret).expect("system randomness");
    secret
}

/// The code of `secret` at time step `step`.
pub fn code(secret: &[u8], step: i64) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, &step.to_be_bytes());
    let bytes = tag.as_ref();
    let offset = (bytes[bytes.len() - 1] & 0x0f) as usize;
    let binary = (u32::from(bytes[offset] & 0x7f) << 24)
        | (u32::from(bytes[offset + 1]) << 16)
        | (u32::from(bytes[offset + 2]) << 8)
        | u32::from(bytes[offset + 3]);
    format!("{:0width$}", binary % 10u32.pow(DIGITS), width = DIGITS as usize)
}

/// The step of a Unix time.
pub fn step_of(unix: i64) -> i64 {
    unix.div_euclid(STEP)
}

/// The step `code` is valid for around `now_step` (±1), if any and newer
/// than `last_step`.
pub fn verify(secret: &[u8], code_given: &str, now_step: i64, last_step: Option<i64>) -> Option<i64> {
    let code_given = code_given.trim();
    if code_given.len() != DIGITS as usize || !code_given.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    [now_step, now_step - 1, now_step + 1].into_iter().filter(|step| last_step.is_none_or(|last| *step > last)).find(
        |step| {
            aws_lc_rs::constant_time::verify_slices_are_equal(code(secret, *step).as_bytes(), code_given.as_bytes())
                .is_ok()
        },
    )
}

/// Decodes [`base32`] text (upper case, no padding); `None` on any other
/// character.
pub fn base32_decode(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut buffer, mut bits, mut out) = (0u32, 0u32, Vec::new());
    for c in text.chars() {
        buffer = (buffer << 5) | ALPHABET.find(c)? as u32;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    Some(out)
}

/// RFC 4648 base32 without padding (what `otpauth://` URIs carry).
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base32_round_trips() {
        let secret = super::new_secret();
        assert_eq!(super::base32_decode(&super::base32(&secret)), Some(secret));
        assert_eq!(super::base32_decode("abc"), None);
    }

    use super::*;

    #[test]
    fn rfc_6238_sha1_vectors() {
        // RFC 6238 appendix B, SHA-1 seed, last 6 of the 8 digits.
        let seed = b"12345678901234567890";
        for (time, expected) in
            [(59, "287082"), (1_111_111_109, "081804"), (1_234_567_890, "005924"), (2_000_000_000, "279037")]
        {
            assert_eq!(code(seed, step_of(time)), expected, "t = {time}");
        }
    }

    #[test]
    fn codes_are_accepted_once_within_one_step_of_drift() {
        let secret = new_secret();
        let now = step_of(1_700_000_000);
        assert_eq!(verify(&secret, &code(&secret, now - 1), now, None), Some(now - 1));
        assert_eq!(verify(&secret, &code(&secret, now + 1), now, None), Some(now + 1));
        assert_eq!(verify(&secret, &code(&secret, now - 2), now, None), None, "too old");
        assert_eq!(verify(&secret, &code(&secret, now), now, Some(now)), None, "replayed");
        assert_eq!(verify(&secret, "12345", now, None), None);
    }

    #[test]
    fn base32_follows_rfc_4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
    }
}
