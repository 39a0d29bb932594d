//! Who is calling: API key authentication (constant time), per-key tiers, and the
//! anonymous per-IP identity (with trusted-proxy `X-Forwarded-For` handling).
//!
//! `AuthConfig` is rebuilt from settings on SIGHUP and swapped in atomically, so a
//! reload never drops a request in flight.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use arc_swap::ArcSwap;

use crate::api::original::ApiError;
use crate::ratelimit::{bucket_key, BucketPolicy, TokenLimits};
use crate::settings::{Settings, SettingsError};

/// Longer presented keys are refused before hashing; no real key comes near this.
const MAX_KEY_BYTES: usize = 4096;

/// Who is calling, decided by authentication and read by the limiter.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    /// The client's bucket key (`ratelimit:` + digest); the raw key is not kept.
    pub bucket_key: Arc<str>,
    /// The client's bucket policy.
    pub policy: Arc<BucketPolicy>,
}

/// Anonymous access settings.
struct Anonymous {
    policy: Arc<BucketPolicy>,
    trusted_proxies: Vec<IpNet>,
}

/// What a configured key maps to.
struct KeyEntry {
    policy: Arc<BucketPolicy>,
    /// Computed once at load: deriving it per request (a second SHA-256, hex, two
    /// string formats) showed up in the hit path's profile.
    bucket_key: Arc<str>,
}

/// Keys (as SHA-256 digests) with their policies, and the anonymous rules.
pub struct AuthConfig {
    keys: HashMap<[u8; 32], KeyEntry>,
    anonymous: Option<Anonymous>,
}

impl AuthConfig {
    /// Builds the configuration from validated settings.
    pub fn from_settings(settings: &Settings) -> Result<AuthConfig, SettingsError> {
        let defaults = TokenLimits {
            per_minute: settings.rate_limiter_tokens_per_minute,
            budget: settings.rate_limiter_token_budget,
            period: settings.rate_limiter_token_budget_period,
            default_max_tokens: settings.rate_limiter_default_max_tokens,
        };
        let default = Arc::new(BucketPolicy {
            tier: "default".into(),
            capacity: settings.rate_limiter_capacity,
            refill_rate: settings.rate_limiter_refill_rate,
            tokens: defaults,
        });
        // A tier's token limits it does not set are the defaults.
        let tiers: Vec<Arc<BucketPolicy>> = settings
            .tiers()?
            .into_iter()
            .map(|t| {
                Arc::new(BucketPolicy {
                    tier: t.name.into(),
                    capacity: t.capacity,
                    refill_rate: t.refill_rate,
                    tokens: TokenLimits {
                        per_minute: t.tokens_per_minute.unwrap_or(defaults.per_minute),
                        budget: t.token_budget.unwrap_or(defaults.budget),
                        period: t.budget_period.unwrap_or(defaults.period),
                        default_max_tokens: defaults.default_max_tokens,
                    },
                })
            })
            .collect();
        let tier = |name: &str| tiers.iter().find(|t| &*t.tier == name).cloned();
        let assignments = settings.key_tiers()?;
        let keys = settings
            .api_key_list()
            .into_iter()
            .map(|key| {
                let policy = assignments
                    .iter()
                    .find(|(k, _)| *k == key)
                    .and_then(|(_, name)| tier(name))
                    .unwrap_or_else(|| default.clone());
                let entry = KeyEntry {
                    policy,
                    bucket_key: bucket_key(&format!("key:{key}")).into(),
                };
                (Sha256::digest(key.as_bytes()).into(), entry)
            })
            .collect();
        let anonymous = match settings.allow_anonymous {
            true => Some(Anonymous {
                policy: tier("anonymous").unwrap_or_else(|| default.clone()),
                trusted_proxies: settings.trusted_proxy_nets()?,
            }),
            false => None,
        };
        Ok(AuthConfig { keys, anonymous })
    }

    /// The entry (policy and bucket key) of `presented` if it is a configured key.
    ///
    /// Keys are looked up by the SHA-256 digest of the presented key, never compared as
    /// plain text: whatever timing the lookup has depends only on the digest of the
    /// caller's own input, which reveals nothing about a prefix of any real key. The
    /// final equality check is constant time, and the cost is O(1) however many keys are
    /// configured.
    fn entry_for_key(&self, presented: &str) -> Option<&KeyEntry> {
        if presented.len() > MAX_KEY_BYTES {
            return None;
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let (known, entry) = self.keys.get_key_value(&digest)?;
        bool::from(known.ct_eq(&digest)).then_some(entry)
    }

    /// The identity of a request presenting `key` (None: no key at all): the key's, or
    /// with anonymous access and no key, its client IP's. `None` means 401.
    pub fn identify(
        &self,
        key: Option<&str>,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Option<ClientIdentity> {
        match key {
            Some(key) => {
                let entry = self.entry_for_key(key)?;
                Some(ClientIdentity {
                    bucket_key: entry.bucket_key.clone(),
                    policy: entry.policy.clone(),
                })
            }
            None => {
                let anonymous = self.anonymous.as_ref()?;
                let ip = client_ip(headers, peer?, &anonymous.trusted_proxies);
                Some(ClientIdentity {
                    bucket_key: bucket_key(&format!("ip:{}", group(ip))).into(),
                    policy: anonymous.policy.clone(),
                })
            }
        }
    }
}

/// How a door reads the key a client presents, and answers, in its own dialect, when
/// the key is wrong or the gateway is at its concurrency cap.
pub trait KeyDoor {
    /// The presented key: `Some(Err(()))` for a key header that is not text (a 401),
    /// `None` for no key at all.
    fn presented_key(headers: &HeaderMap) -> Option<Result<&str, ()>>;
    /// The door's 401.
    fn unauthorized() -> Response;
    /// The door's 503 when too many chat requests are in flight.
    fn overloaded() -> Response;
}

/// The original door: `X-API-Key` only, FastAPI's `{"detail"}` 401.
pub struct OriginalDoor;

impl KeyDoor for OriginalDoor {
    fn presented_key(headers: &HeaderMap) -> Option<Result<&str, ()>> {
        headers.get("x-api-key").map(|v| v.to_str().map_err(drop))
    }

    fn unauthorized() -> Response {
        ApiError::Unauthorized.into_response()
    }

    fn overloaded() -> Response {
        ApiError::Unavailable(
            "Gateway overloaded: too many requests in flight; try again shortly".into(),
        )
        .into_response()
    }
}

/// The key of the SDK doors: `Authorization: Bearer <key>`, else `X-API-Key` (the
/// OpenAI SDK sends the first, the Anthropic SDK the second).
pub fn bearer_or_api_key(headers: &HeaderMap) -> Option<Result<&str, ()>> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let Ok(value) = value.to_str() else {
            return Some(Err(()));
        };
        let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
        return Some(if scheme.eq_ignore_ascii_case("bearer") {
            Ok(token.trim())
        } else {
            Err(())
        });
    }
    headers.get("x-api-key").map(|v| v.to_str().map_err(drop))
}

/// The client's address: the peer, unless the peer is a trusted proxy, in which case
/// `X-Forwarded-For` is walked from the right past trusted proxies to the first
/// address that is not one (an unparsable entry stops the walk).
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(&canonical(*ip)));
    let mut client = peer;
    if !is_trusted(&client) {
        return canonical(client);
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.into_iter().rev() {
        let Some(ip) = parse_hop(hop) else { break };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    canonical(client)
}

/// Parses an `X-Forwarded-For` entry: an address, optionally with a port or brackets.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok()
        })
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The limiting group of an address: itself for IPv4, its /64 for IPv6 (one host
/// usually holds a whole /64, so per-address limits would be trivial to dodge).
fn group(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// The running [`AuthConfig`], swapped whole on reload (SIGHUP).
#[derive(Clone)]
pub struct Keys(pub Arc<ArcSwap<AuthConfig>>);

impl Keys {
    /// Keys serving `config` until the next reload.
    pub fn new(config: AuthConfig) -> Keys {
        Keys(Arc::new(ArcSwap::from_pointee(config)))
    }

    /// Serves `config` from now on; requests in flight keep the one they started with.
    pub fn replace(&self, config: AuthConfig) {
        self.0.store(Arc::new(config));
    }
}

/// Middleware: the door's 401 unless the request has a configured key (or anonymous
/// access applies); otherwise attaches the client's identity for the limiter.
pub async fn require_key<D: KeyDoor>(
    State(keys): State<Keys>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let identity = match D::presented_key(request.headers()) {
        Some(Err(())) => None,
        Some(Ok(key)) => keys.0.load().identify(Some(key), request.headers(), peer),
        None => keys.0.load().identify(None, request.headers(), peer),
    };
    let Some(identity) = identity else {
        return D::unauthorized();
    };
    request.extensions_mut().insert(identity);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> AuthConfig {
        AuthConfig::from_settings(&Settings::from_pairs(pairs).unwrap()).unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_configured_keys_are_accepted_with_their_tier() {
        let auth = config(&[
            ("API_KEYS", "sk-a,sk-b"),
            ("RATE_LIMITER_TIERS", "gold:50:5"),
            ("API_KEY_TIERS", "sk-b=gold"),
        ]);
        assert_eq!(&*auth.entry_for_key("sk-a").unwrap().policy.tier, "default");
        let gold = &auth.entry_for_key("sk-b").unwrap().policy;
        assert_eq!(
            (&*gold.tier, gold.capacity, gold.refill_rate),
            ("gold", 50, 5.0)
        );
        for wrong in ["sk-c", "", "sk-a ", "SK-A"] {
            assert!(auth.entry_for_key(wrong).is_none(), "{wrong}");
        }
        assert!(auth.entry_for_key(&"x".repeat(100_000)).is_none());
        // Each key has its own bucket, named by a digest of the key, never the key.
        let bucket = |key: &str| {
            let identity = auth.identify(Some(key), &HeaderMap::new(), None);
            identity.unwrap().bucket_key
        };
        assert_eq!(&*bucket("sk-a"), bucket_key("key:sk-a"));
        assert_ne!(bucket("sk-a"), bucket("sk-b"));
        assert!(!bucket("sk-a").contains("sk-a"));
    }

    #[test]
    fn anonymous_requests_are_refused_unless_enabled_and_wrong_keys_always_are() {
        let peer = Some("192.0.2.1".parse().unwrap());
        let closed = config(&[]);
        assert!(closed.identify(None, &headers(&[]), peer).is_none());
        let open = config(&[
            ("ALLOW_ANONYMOUS", "true"),
            ("RATE_LIMITER_TIERS", "anonymous:2:0.1"),
        ]);
        let id = open.identify(None, &headers(&[]), peer).unwrap();
        assert_eq!(&*id.policy.tier, "anonymous");
        assert!(open.identify(Some("wrong"), &headers(&[]), peer).is_none());
    }

    #[test]
    fn sdk_doors_read_a_bearer_token_or_the_api_key_header() {
        let key = |pairs: &[(&'static str, &str)]| {
            bearer_or_api_key(&headers(pairs)).map(|k| k.map(str::to_owned))
        };
        assert_eq!(
            key(&[("authorization", "Bearer sk-a")]),
            Some(Ok("sk-a".into()))
        );
        assert_eq!(
            key(&[("authorization", "bearer  sk-a ")]),
            Some(Ok("sk-a".into()))
        );
        assert_eq!(key(&[("x-api-key", "sk-b")]), Some(Ok("sk-b".into())));
        assert_eq!(
            key(&[("authorization", "Bearer sk-a"), ("x-api-key", "sk-b")]),
            Some(Ok("sk-a".into())),
            "the bearer token wins"
        );
        assert_eq!(key(&[("authorization", "Basic c2s6")]), Some(Err(())));
        assert_eq!(key(&[]), None);
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers(&[("x-forwarded-for", "203.0.113.9, 10.1.1.1")]);
        let from_proxy = client_ip(&h, "10.0.0.2".parse().unwrap(), &trusted);
        assert_eq!(from_proxy, "203.0.113.9".parse::<IpAddr>().unwrap());
        let from_stranger = client_ip(&h, "198.51.100.7".parse().unwrap(), &trusted);
        assert_eq!(from_stranger, "198.51.100.7".parse::<IpAddr>().unwrap());
        // A spoofed leftmost entry does not win over the first untrusted hop.
        let spoofed = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9")]);
        let ip = client_ip(&spoofed, "10.0.0.2".parse().unwrap(), &trusted);
        assert_eq!(ip, "203.0.113.9".parse::<IpAddr>().unwrap());
        let garbage = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(
            client_ip(&garbage, "10.0.0.2".parse().unwrap(), &trusted),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv6_clients_are_grouped_by_slash_64() {
        let a = group("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = group("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = group("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            group("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }
}
