//! The wire types of the CA's HTTPS API (JSON), shared by the CA and its
//! clients (the node proxies).
//!
//! - `POST /v1/sign` with `Authorization: Bearer <node token>` and a
//!   [`SignRequest`] body answers a [`SignResponse`].
//! - `GET /v1/trust-bundle` answers a [`TrustBundleResponse`].
//! - `GET /metrics` answers Prometheus text.
//!
//! Refusals carry an [`ErrorResponse`] whose text is deliberately opaque;
//! the CA's log has the reason.

use serde::{Deserialize, Serialize};

use crate::identity::Identity;

/// The CA's default port.
pub const DEFAULT_PORT: u16 = 15012;
/// Path of the signing endpoint.
pub const SIGN_PATH: &str = "/v1/sign";
/// Path of the trust bundle endpoint.
pub const TRUST_BUNDLE_PATH: &str = "/v1/trust-bundle";
/// Path of the Prometheus endpoint.
pub const METRICS_PATH: &str = "/metrics";
/// Largest request body the CA reads. A P-384 or RSA-4096 CSR in PEM with
/// its JSON envelope is well under 8 KiB.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Largest response body a client reads.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// A node proxy asks for a certificate for one workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    /// The identity the certificate is for. The CA builds the certificate
    /// from this (after checking the caller may have it), never from the CSR.
    pub identity: Identity,
    /// PKCS#10 CSR, PEM (`CERTIFICATE REQUEST`). Its SANs, if any, must be
    /// exactly the identity's URI; its subject is ignored.
    pub csr: String,
    /// Requested lifetime in seconds; the CA's default when absent. Above
    /// the CA's cap the request is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// A signed X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignResponse {
    pub identity: Identity,
    /// PEM certificates, leaf first, then any intermediates (never the root).
    pub certificate_chain: Vec<String>,
    /// PEM roots every workload of the trust domain should trust now.
    pub trust_bundle: Vec<String>,
    /// Leaf serial number, lowercase hex.
    pub serial: String,
    /// Validity, seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
}

/// The trust bundle: the roots of the trust domain (several during a root
/// rotation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustBundleResponse {
    pub trust_domain: String,
    pub roots: Vec<String>,
}

/// Body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

/// Why a request body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("request body of {len} bytes is over the limit of {MAX_REQUEST_BYTES}")]
    TooLarge { len: usize },
    #[error("request body is not a valid sign request: {0}")]
    Json(#[from] serde_json::Error),
}

/// Decodes a [`SignRequest`] body, refusing oversize input before parsing.
pub fn decode_sign_request(body: &[u8]) -> Result<SignRequest, DecodeError> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(DecodeError::TooLarge { len: body.len() });
    }
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sign_request_round_trips_and_refuses_unknown_fields() {
        let req = SignRequest {
            identity: Identity::parse("spiffe://td/ns/a/sa/b").unwrap(),
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            ttl_seconds: None,
        };
        let json = serde_json::to_vec(&req).unwrap();
        assert_eq!(decode_sign_request(&json).unwrap(), req);
        let bad = br#"{"identity":"spiffe://td/ns/a/sa/b","csr":"x","sans":["a"]}"#;
        assert!(
            decode_sign_request(bad)
                .unwrap_err()
                .to_string()
                .contains("sans")
        );
        let bad_id = br#"{"identity":"spiffe://td/ns/A/sa/b","csr":"x"}"#;
        assert!(
            decode_sign_request(bad_id)
                .unwrap_err()
                .to_string()
                .contains("\"A\"")
        );
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(matches!(
            decode_sign_request(&big),
            Err(DecodeError::TooLarge { .. })
        ));
    }
}
