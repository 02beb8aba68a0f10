//! Single-use tickets that open a notification stream without an
//! `Authorization` header (a browser's `EventSource` cannot send one).
//!
//! A ticket is `hex(user id ‖ expiry ‖ nonce) . hex(HMAC-SHA256)`, signed
//! with this process's ticket key: nothing is written anywhere (the query
//! API may run on a read-only standby). Redeeming one checks the MAC and the
//! expiry, then records its nonce in memory until it expires; a second
//! redemption finds it there and is refused. The memory is per process:
//! with several query-api processes sharing `SOUK_NOTIFICATION_TICKET_SECRET`,
//! a ticket could be redeemed once per process within its lifetime (see
//! ARCHITECTURE.md); without the secret each process has a random key of
//! its own and only honours its own tickets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use http_kit::ApiError;
use rand::RngCore;
use sha2::Sha256;
use uuid::Uuid;

/// Longest a ticket is valid, in seconds.
pub const TICKET_TTL_S: i64 = 60;
/// Most tickets outstanding (issued and not expired) at once; past it, new
/// tickets are refused with 503 until old ones expire.
const MAX_OUTSTANDING: usize = 100_000;
/// The payload: a user id (16 bytes), an expiry (8) and a nonce (16).
const PAYLOAD_BYTES: usize = 40;
/// Longest text read as a ticket.
pub const MAX_TICKET_LEN: usize = 2 * PAYLOAD_BYTES + 1 + 64;

type HmacSha256 = Hmac<Sha256>;

/// A ticket just issued.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub ticket: String,
    pub expires_at: DateTime<Utc>,
}

/// The tickets of one process; cheap to clone.
#[derive(Clone)]
pub struct Tickets {
    key: Arc<[u8]>,
    /// Nonces issued and not yet expired, with whether each was redeemed.
    issued: Arc<Mutex<HashMap<[u8; 16], Issued>>>,
}

#[derive(Debug, Clone, Copy)]
struct Issued {
    expires: i64,
    redeemed: bool,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets").finish_non_exhaustive()
    }
}

impl Tickets {
    /// Tickets signed with `secret`, or with a random key of this process's
    /// own when none is given.
    pub fn new(secret: Option<&str>) -> Self {
        let key: Arc<[u8]> = match secret {
            Some(secret) => Arc::from(secret.as_bytes()),
            None => {
                let mut key = [0_u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut key);
                Arc::from(&key[..])
            }
        };
        Self {
            key,
            issued: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes a key of any length")
    }

    /// A ticket for `user`, valid for [`TICKET_TTL_S`] seconds.
    pub fn issue(&self, user: Uuid) -> Result<Ticket, ApiError> {
        let expires_at = Utc::now() + chrono::Duration::seconds(TICKET_TTL_S);
        let mut nonce = [0_u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        {
            let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
            forget_expired(&mut issued);
            if issued.len() >= MAX_OUTSTANDING {
                tracing::warn!("too many notification tickets outstanding");
                return Err(ApiError::Unavailable);
            }
            issued.insert(
                nonce,
                Issued {
                    expires: expires_at.timestamp(),
                    redeemed: false,
                },
            );
        }
        let mut payload = Vec::with_capacity(PAYLOAD_BYTES);
        payload.extend_from_slice(user.as_bytes());
        payload.extend_from_slice(&expires_at.timestamp().to_be_bytes());
        payload.extend_from_slice(&nonce);
        let mut mac = self.mac();
        mac.update(&payload);
        let signature = mac.finalize().into_bytes();
        Ok(Ticket {
            ticket: format!("{}.{}", hex::encode(&payload), hex::encode(signature)),
            expires_at,
        })
    }

    /// The user a ticket was issued to, once: a forged, expired or already
    /// used ticket is 401. The ticket itself never appears in a message.
    pub fn redeem(&self, ticket: &str) -> Result<Uuid, ApiError> {
        let refuse = |why: &str| ApiError::Unauthorized(format!("the ticket {why}"));
        if ticket.len() > MAX_TICKET_LEN {
            return Err(refuse("is not a notification ticket"));
        }
        let (payload, signature) = ticket
            .split_once('.')
            .ok_or_else(|| refuse("is not a notification ticket"))?;
        let mut payload_bytes = [0_u8; PAYLOAD_BYTES];
        let mut signature_bytes = [0_u8; 32];
        hex::decode_to_slice(payload, &mut payload_bytes)
            .and_then(|()| hex::decode_to_slice(signature, &mut signature_bytes))
            .map_err(|_| refuse("is not a notification ticket"))?;
        let mut mac = self.mac();
        mac.update(&payload_bytes);
        mac.verify_slice(&signature_bytes)
            .map_err(|_| refuse("was not issued by this service"))?;
        let (user, rest) = payload_bytes.split_at(16);
        let (expires, nonce) = rest.split_at(8);
        let expires = i64::from_be_bytes(expires.try_into().expect("8 bytes"));
        if expires <= Utc::now().timestamp() {
            return Err(refuse("has expired"));
        }
        let nonce: [u8; 16] = nonce.try_into().expect("16 bytes");
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        match issued.get_mut(&nonce) {
            Some(entry) if !entry.redeemed => entry.redeemed = true,
            Some(_) => return Err(refuse("was used already")),
            // Signed with the shared secret by another process: remember it
            // here too, so that it is used once on this process at most.
            None => {
                issued.insert(
                    nonce,
                    Issued {
                        expires,
                        redeemed: true,
                    },
                );
            }
        }
        Ok(Uuid::from_bytes(user.try_into().expect("16 bytes")))
    }
}

fn forget_expired(issued: &mut HashMap<[u8; 16], Issued>) {
    let now = Utc::now().timestamp();
    if issued.len() >= 1024 {
        issued.retain(|_, entry| entry.expires > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_once_for_its_user() {
        let tickets = Tickets::new(None);
        let user = Uuid::now_v7();
        let ticket = tickets.issue(user).unwrap();
        assert!(ticket.expires_at <= Utc::now() + chrono::Duration::seconds(TICKET_TTL_S));
        assert_eq!(tickets.redeem(&ticket.ticket).unwrap(), user);
        let again = tickets.redeem(&ticket.ticket).unwrap_err();
        assert!(again.to_string().contains("used already"), "{again}");
    }

    #[test]
    fn forged_altered_and_foreign_tickets_are_refused() {
        let tickets = Tickets::new(None);
        let ticket = tickets.issue(Uuid::now_v7()).unwrap().ticket;
        let mut altered = ticket.clone().into_bytes();
        altered[3] = if altered[3] == b'0' { b'1' } else { b'0' };
        let altered = String::from_utf8(altered).unwrap();
        let foreign = Tickets::new(None).issue(Uuid::now_v7()).unwrap().ticket;
        for bad in ["", "nonsense", "ab.cd", altered.as_str(), foreign.as_str()] {
            let error = tickets.redeem(bad).unwrap_err();
            assert_eq!(error.code(), "unauthorized", "{bad}");
            assert!(!error.to_string().contains(bad) || bad.is_empty());
        }
    }

    #[test]
    fn processes_sharing_a_secret_honour_each_others_tickets_once() {
        let (first, second) = (Tickets::new(Some("s3cret")), Tickets::new(Some("s3cret")));
        let user = Uuid::now_v7();
        let ticket = first.issue(user).unwrap().ticket;
        assert_eq!(second.redeem(&ticket).unwrap(), user);
        assert!(second.redeem(&ticket).is_err());
    }

    #[test]
    fn an_expired_ticket_is_refused() {
        let tickets = Tickets::new(None);
        let mut payload = Vec::new();
        payload.extend_from_slice(Uuid::now_v7().as_bytes());
        payload.extend_from_slice(&(Utc::now().timestamp() - 1).to_be_bytes());
        payload.extend_from_slice(&[7; 16]);
        let mut mac = tickets.mac();
        mac.update(&payload);
        let ticket = format!(
            "{}.{}",
            hex::encode(&payload),
            hex::encode(mac.finalize().into_bytes())
        );
        let error = tickets.redeem(&ticket).unwrap_err();
        assert!(error.to_string().contains("expired"), "{error}");
    }
}
