//! TLS to a remote LXD daemon the way `lxc remote add` trusts one: the client proves itself
//! with a certificate the daemon trusts, and the daemon's own certificate (self-signed, its
//! names rarely matching the address) is accepted only when its SHA-256 fingerprint is the one
//! the operator pinned. No CA is involved.

use std::path::Path;
use std::sync::Arc;

use drover_core::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// A client configuration presenting `cert` and `key` (PEM files) and trusting only a server
/// whose certificate has the SHA-256 `fingerprint` (hex, colons and case ignored).
pub fn client_config(
    cert: &Path,
    key: &Path,
    fingerprint: &str,
) -> Result<Arc<rustls::ClientConfig>> {
    let pinned = parse_fingerprint(fingerprint)?;
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<std::result::Result<Vec<_>, _>>)
        .map_err(|err| {
            Error::system(format!("cannot read client_cert {}: {err}", cert.display()))
        })?;
    if chain.is_empty() {
        return Err(Error::system(format!(
            "client_cert {} holds no PEM certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|err| Error::system(format!("cannot read client_key {}: {err}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedServer {
        fingerprint: pinned,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| Error::system(format!("TLS setup: {err}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(|err| Error::system(format!("client_cert and client_key do not match: {err}")))?;
    Ok(Arc::new(config))
}

/// The 32 bytes of a SHA-256 fingerprint written in hex, as `lxc info` and LXD's
/// `certificate_fingerprint` show it (colons allowed).
fn parse_fingerprint(text: &str) -> Result<[u8; 32]> {
    let hex: String = text
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let bad = || {
        Error::system(format!(
            "server_fingerprint {text:?} is not a SHA-256 fingerprint (64 hex digits); take it from `lxc info` on the server (certificate_fingerprint)"
        ))
    };
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Accepts exactly the server certificate with the pinned fingerprint; handshake signatures
/// are still checked against that certificate's key.
#[derive(Debug)]
struct PinnedServer {
    fingerprint: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let presented = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if presented.as_ref() == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate has fingerprint {}, not the pinned server_fingerprint {}",
                hex(presented.as_ref()),
                hex(&self.fingerprint)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_read_as_lxc_prints_them_with_or_without_colons() {
        let plain = "AB".repeat(32);
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(parse_fingerprint(&plain).expect("plain"), [0xab; 32]);
        assert_eq!(parse_fingerprint(&colons).expect("colons"), [0xab; 32]);
    }

    #[test]
    fn a_short_or_non_hex_fingerprint_is_refused_with_where_to_find_it() {
        for bad in ["abc", &"zz".repeat(32)] {
            let err = parse_fingerprint(bad).expect_err(bad).to_string();
            assert!(err.contains("lxc info"), "{err}");
        }
    }
}
