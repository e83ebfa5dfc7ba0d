//! `tandem certs`: a private CA and one certificate per node, for mutual TLS
//! (G7). Every node gets `ca.pem` plus its own `NAME.pem`/`NAME.key`; the CA
//! key `ca.key` stays with the administrator to sign more nodes later.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio_rustls::rustls::pki_types::ServerName;

use super::TransportError;

/// Node certificates are valid for this many years from the start of the
/// current year (renewal is a `tandem certs` run plus a restart).
const VALIDITY_YEARS: i32 = 10;

fn current_year() -> i32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // 365.2425 days per year; off by at most a day around New Year, which the
    // one-year margin on `not_before` absorbs.
    1970 + (secs / 31_556_952) as i32
}

fn check_node_name(name: &str) -> Result<(), TransportError> {
    let valid_dns = matches!(ServerName::try_from(name), Ok(ServerName::DnsName(_)));
    if !valid_dns || name == "ca" || name.contains('/') {
        return Err(TransportError::BadNodeName {
            name: name.to_string(),
        });
    }
    Ok(())
}

fn write_new_file(path: &Path, contents: &str, mode: u32) -> Result<(), TransportError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| TransportError::CertWrite {
            path: path.to_path_buf(),
            source,
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| TransportError::CertWrite {
            path: path.to_path_buf(),
            source,
        })
}

fn rcgen_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> TransportError {
    move |source| TransportError::CertGen { what, source }
}

/// Write `ca.pem`, `ca.key`, and `NAME.pem` + `NAME.key` for every node name
/// into `out_dir` (created if needed). Key files are mode 0600. Each node
/// certificate names the node as its DNS SAN (plus 127.0.0.1 and ::1 for
/// single-host setups) and is usable as both TLS server and client, since
/// either node may dial. Existing files are never overwritten: replacing a
/// CA by accident would lock every node out.
pub fn generate_certs(out_dir: &Path, node_names: &[&str]) -> Result<(), TransportError> {
    if node_names.is_empty() {
        return Err(TransportError::BadNodeName {
            name: String::new(),
        });
    }
    for (i, name) in node_names.iter().enumerate() {
        check_node_name(name)?;
        if node_names[..i].contains(name) {
            return Err(TransportError::DuplicateNodeName {
                name: name.to_string(),
            });
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|source| TransportError::CertWrite {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut targets: Vec<PathBuf> = vec![out_dir.join("ca.pem"), out_dir.join("ca.key")];
    for name in node_names {
        targets.push(out_dir.join(format!("{name}.pem")));
        targets.push(out_dir.join(format!("{name}.key")));
    }
    if let Some(existing) = targets.iter().find(|p| p.exists()) {
        return Err(TransportError::CertExists {
            path: existing.clone(),
        });
    }

    let year = current_year();
    let not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    let not_after = rcgen::date_time_ymd(year + VALIDITY_YEARS, 1, 1);

    let ca_key = KeyPair::generate().map_err(rcgen_error("CA key"))?;
    let mut ca_params = CertificateParams::default();
    let mut ca_dn = DistinguishedName::new();
    ca_dn.push(DnType::CommonName, "tandem CA");
    ca_params.distinguished_name = ca_dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(rcgen_error("CA certificate"))?;

    let mut nodes = Vec::with_capacity(node_names.len());
    for name in node_names {
        let key = KeyPair::generate().map_err(rcgen_error("node key"))?;
        let mut params = CertificateParams::new(vec![
            name.to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .map_err(rcgen_error("node certificate names"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, *name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        // nbd (issue 13): no keyUsage extension on node and client certificates.
        // The extended key usage below already limits them to TLS; qemu's x509
        // credential check (crypto/tlscredsx509.c) refuses a certificate whose
        // keyUsage lacks keyEncipherment, which an ECDSA key must not assert
        // (RFC 5480), so qemu accepts these only without the extension.
        params.key_usages = Vec::new();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .signed_by(&key, &ca_cert, &ca_key)
            .map_err(rcgen_error("node certificate"))?;
        nodes.push((*name, cert.pem(), key.serialize_pem()));
    }

    // Everything is generated before the first file is written, so a
    // generation failure leaves no partial set behind.
    write_new_file(&out_dir.join("ca.pem"), &ca_cert.pem(), 0o644)?;
    write_new_file(&out_dir.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;
    for (name, cert_pem, key_pem) in nodes {
        write_new_file(&out_dir.join(format!("{name}.pem")), &cert_pem, 0o644)?;
        write_new_file(&out_dir.join(format!("{name}.key")), &key_pem, 0o600)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_ca_and_node_files_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        generate_certs(dir.path(), &["alpha", "beta"]).unwrap();
        for (file, mode) in [
            ("ca.pem", 0o644),
            ("ca.key", 0o600),
            ("alpha.pem", 0o644),
            ("alpha.key", 0o600),
            ("beta.pem", 0o644),
            ("beta.key", 0o600),
        ] {
            let meta = std::fs::metadata(dir.path().join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
            assert!(meta.len() > 100, "{file}");
        }
    }

    #[test]
    fn refuses_to_overwrite_and_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        generate_certs(dir.path(), &["alpha"]).unwrap();
        assert!(matches!(
            generate_certs(dir.path(), &["alpha"]),
            Err(TransportError::CertExists { .. })
        ));
        for bad in ["", "has space", "ca", "1.2.3.4", "a/b"] {
            assert!(
                matches!(
                    generate_certs(dir.path(), &[bad]),
                    Err(TransportError::BadNodeName { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            generate_certs(dir.path(), &["x", "x"]),
            Err(TransportError::DuplicateNodeName { .. })
        ));
    }
}
