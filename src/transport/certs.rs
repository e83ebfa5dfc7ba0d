//! `tandem certs`: a private CA and one certificate per node, for mutual TLS
//! (G7). Every node gets `ca.pem` plus its own `NAME.pem`/`NAME.key`; the CA
//! key `ca.key` stays with the administrator to sign more nodes later
//! ([`sign_node_cert`], `tandem certs --ca DIR`), which also renews one.
//!
//! Also the start-up check of a node's TLS files ([`check_tls_files`]): the
//! agent runs it before it creates or opens anything, so a missing or wrong
//! certificate stops it before a volume or metadata file exists.
//!
//! Validity: from one day before now (clocks of two hosts disagree by a few
//! minutes, sometimes hours) to `valid_years` after now. A node certificate
//! signed by an existing CA never outlives that CA.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::ServerCertVerifier;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::{TlsFiles, TransportError};

/// Default validity of new certificates, in years. Long enough that a pair is
/// not locked out by a forgotten renewal; `tandem certs --valid-years N` for
/// a policy that wants shorter.
pub const VALID_YEARS_DEFAULT: u32 = 10;

/// Errors of `tandem certs --ca` and of the start-up check of a node's TLS files.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(
        "{path} is not a usable CA certificate ({reason}); --ca DIR must hold the ca.pem and ca.key written by `tandem certs --out DIR`"
    )]
    CaInvalid { path: PathBuf, reason: String },
    #[error(
        "{cert} is not a valid certificate for node {name:?} under {ca}: {reason}; issue a new one with `tandem certs --ca CA_DIR --name {name} --out DIR` (add --renew to replace it)"
    )]
    NodeCertificate {
        cert: PathBuf,
        ca: PathBuf,
        name: String,
        reason: String,
    },
    #[error(
        "this node and its peer are both named {name:?}; each node needs its own name (the [nodes.NAME] sections, or --name/--peer-name)"
    )]
    SameName { name: String },
    #[error("--valid-years {years}: expected 1 to 100")]
    ValidYears { years: u32 },
}

/// `now - 1 day` and `now + years`, clamped to `ca_not_after` when given.
fn validity(
    years: u32,
    ca_not_after: Option<OffsetDateTime>,
) -> Result<(OffsetDateTime, OffsetDateTime), CertError> {
    if !(1..=100).contains(&years) {
        return Err(CertError::ValidYears { years });
    }
    let now = OffsetDateTime::now_utc();
    let not_before = now - time::Duration::days(1);
    let target_year = now.year() + years as i32;
    // Feb 29 + N years may not exist: fall back to Feb 28.
    let not_after = now
        .replace_year(target_year)
        .or_else(|_| {
            now.replace_day(28)
                .and_then(|d| d.replace_year(target_year))
        })
        .expect("a date 1 to 100 years ahead exists");
    let not_after = match ca_not_after {
        Some(ca) if ca < not_after => {
            tracing::warn!(
                ca_not_after = %ca,
                "the node certificate would outlive its CA; it ends with the CA"
            );
            ca
        }
        _ => not_after,
    };
    Ok((not_before, not_after))
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

fn check_names(node_names: &[&str]) -> Result<(), TransportError> {
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
    Ok(())
}

fn cert_write_error(path: &Path) -> impl FnOnce(std::io::Error) -> TransportError + '_ {
    move |source| TransportError::CertWrite {
        path: path.to_path_buf(),
        source,
    }
}

/// Create `dir` (and missing parents) mode 0700 whatever the umask; an existing
/// directory is left as it is.
fn create_private_dir(dir: &Path) -> Result<(), TransportError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(cert_write_error(dir))?;
    // The umask may have removed bits; the mode is meant exactly.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(cert_write_error(dir))
}

/// Write a new file with exactly `mode` (whatever the umask), synced.
fn write_new_file(path: &Path, contents: &str, mode: u32) -> Result<(), TransportError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(cert_write_error(path))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents.as_bytes()))
        .and_then(|()| file.sync_all())
        .map_err(cert_write_error(path))
}

/// Replace `path` atomically with `contents` (written beside it, then renamed).
fn replace_file(path: &Path, contents: &str, mode: u32) -> Result<(), TransportError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    write_new_file(&tmp, contents, mode)?;
    std::fs::rename(&tmp, path).map_err(cert_write_error(path))
}

fn rcgen_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> TransportError {
    move |source| TransportError::CertGen { what, source }
}

/// A node certificate for `name`, signed by the CA: the name as DNS SAN (plus
/// 127.0.0.1 and ::1 for single-host setups), usable as TLS server and
/// client, since either node may dial.
fn node_cert(
    name: &str,
    ca_cert: &Certificate,
    ca_key: &KeyPair,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(String, String), TransportError> {
    let key = KeyPair::generate().map_err(rcgen_error("node key"))?;
    let mut params = CertificateParams::new(vec![
        name.to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(rcgen_error("node certificate names"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
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
        .signed_by(&key, ca_cert, ca_key)
        .map_err(rcgen_error("node certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Write `ca.pem`, `ca.key`, and `NAME.pem` + `NAME.key` for every node name
/// into `out_dir` (created mode 0700 if needed), valid for
/// [`VALID_YEARS_DEFAULT`] years. See [`generate_certs_valid_for`].
pub fn generate_certs(out_dir: &Path, node_names: &[&str]) -> Result<(), TransportError> {
    match generate_certs_valid_for(out_dir, node_names, VALID_YEARS_DEFAULT) {
        Ok(()) => Ok(()),
        Err(CertError::Transport(e)) => Err(e),
        Err(e) => unreachable!("the default validity is in range: {e}"),
    }
}

/// Write a new CA and one certificate per node into `out_dir` (created mode
/// 0700 if needed). Key files are mode 0600, certificates 0644, whatever the
/// umask. Existing files are never overwritten: replacing a CA by accident
/// would lock every node out.
pub fn generate_certs_valid_for(
    out_dir: &Path,
    node_names: &[&str],
    valid_years: u32,
) -> Result<(), CertError> {
    check_names(node_names)?;
    let (not_before, not_after) = validity(valid_years, None)?;
    let mut targets: Vec<PathBuf> = vec![out_dir.join("ca.pem"), out_dir.join("ca.key")];
    for name in node_names {
        targets.push(out_dir.join(format!("{name}.pem")));
        targets.push(out_dir.join(format!("{name}.key")));
    }
    if let Some(existing) = targets.iter().find(|p| p.exists()) {
        return Err(TransportError::CertExists {
            path: existing.clone(),
        }
        .into());
    }

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
        let (cert_pem, key_pem) = node_cert(name, &ca_cert, &ca_key, not_before, not_after)?;
        nodes.push((*name, cert_pem, key_pem));
    }

    // Everything is generated before the first file is written, so a
    // generation failure leaves no partial set behind.
    create_private_dir(out_dir)?;
    write_new_file(&out_dir.join("ca.pem"), &ca_cert.pem(), 0o644)?;
    write_new_file(&out_dir.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;
    for (name, cert_pem, key_pem) in nodes {
        write_new_file(&out_dir.join(format!("{name}.pem")), &cert_pem, 0o644)?;
        write_new_file(&out_dir.join(format!("{name}.key")), &key_pem, 0o600)?;
    }
    Ok(())
}

/// What [`sign_node_cert`] wrote.
#[derive(Debug)]
pub struct Signed {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The replaced pair, kept as `NAME.pem.old` / `NAME.key.old` (`renew`).
    pub previous: Option<(PathBuf, PathBuf)>,
    /// `ca.pem` copied into the output directory (it had none).
    pub ca_copied: Option<PathBuf>,
    pub not_after: String,
}

/// Sign a certificate (and a new key) for node `name` with the existing CA in
/// `ca_dir` (`ca.pem` + `ca.key`), into `out_dir` (created mode 0700). An
/// existing `NAME.pem`/`NAME.key` is refused unless `renew`, which keeps the
/// old pair as `NAME.pem.old`/`NAME.key.old` and replaces it atomically.
/// `ca.pem` is copied into `out_dir` when it has none, so that the directory is
/// a node's complete TLS directory.
pub fn sign_node_cert(
    ca_dir: &Path,
    name: &str,
    out_dir: &Path,
    valid_years: u32,
    renew: bool,
) -> Result<Signed, CertError> {
    check_node_name(name)?;
    let ca_pem_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca.key");
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| TransportError::CertFileRead {
            path: path.to_path_buf(),
            source,
        })
    };
    let ca_pem = read(&ca_pem_path)?;
    let ca_key_pem = read(&ca_key_path)?;
    let ca_invalid = |path: &Path, reason: String| CertError::CaInvalid {
        path: path.to_path_buf(),
        reason,
    };
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| ca_invalid(&ca_key_path, format!("not a private key: {e}")))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_pem)
        .map_err(|e| ca_invalid(&ca_pem_path, e.to_string()))?;
    if !matches!(ca_params.is_ca, IsCa::Ca(_)) {
        return Err(ca_invalid(
            &ca_pem_path,
            "it is not a CA certificate (no basicConstraints CA:TRUE)".into(),
        ));
    }
    let ca_not_after = ca_params.not_after;
    // rcgen signs with an issuer `Certificate`: re-sign the parsed CA's fields with
    // its own key. Only its subject and key identifier go into the node's
    // certificate, so the result chains to the original ca.pem; a key that does
    // not belong to ca.pem is caught by the check below.
    let issuer = ca_params
        .self_signed(&ca_key)
        .map_err(|e| ca_invalid(&ca_key_path, e.to_string()))?;
    let (not_before, not_after) = validity(valid_years, Some(ca_not_after))?;
    let (cert_pem, key_pem) = node_cert(name, &issuer, &ca_key, not_before, not_after)?;
    // Prove the new certificate chains to the CA as it is on disk before writing
    // anything (a ca.key of another CA would otherwise produce a useless pair).
    verify_node_cert(&ca_pem_path, &ca_pem, &cert_pem, name).map_err(|reason| {
        ca_invalid(
            &ca_key_path,
            format!("ca.key does not belong to ca.pem ({reason})"),
        )
    })?;

    let cert = out_dir.join(format!("{name}.pem"));
    let key = out_dir.join(format!("{name}.key"));
    let exists = cert.exists() || key.exists();
    if exists && !renew {
        return Err(TransportError::CertExists {
            path: if cert.exists() { cert } else { key },
        }
        .into());
    }
    create_private_dir(out_dir)?;
    let mut previous = None;
    if exists {
        let old = |p: &Path| {
            let mut o = p.as_os_str().to_owned();
            o.push(".old");
            PathBuf::from(o)
        };
        let (old_cert, old_key) = (old(&cert), old(&key));
        if cert.exists() {
            std::fs::copy(&cert, &old_cert).map_err(cert_write_error(&old_cert))?;
        }
        if key.exists() {
            std::fs::copy(&key, &old_key).map_err(cert_write_error(&old_key))?;
            std::fs::set_permissions(&old_key, std::fs::Permissions::from_mode(0o600))
                .map_err(cert_write_error(&old_key))?;
        }
        previous = Some((old_cert, old_key));
    }
    // Key first: a crash between the two renames leaves the old certificate with
    // a new key, which the start-up check reports, never a silent mismatch.
    replace_file(&key, &key_pem, 0o600)?;
    replace_file(&cert, &cert_pem, 0o644)?;
    let out_ca = out_dir.join("ca.pem");
    let ca_copied = if out_ca.exists() {
        None
    } else {
        write_new_file(&out_ca, &ca_pem, 0o644)?;
        Some(out_ca)
    };
    Ok(Signed {
        cert,
        key,
        previous,
        ca_copied,
        not_after: not_after.date().to_string(),
    })
}

/// Check that `cert_pem` is valid now for `name` and chains to the CA(s) in `ca_pem`.
fn verify_node_cert(
    ca_path: &Path,
    ca_pem: &str,
    cert_pem: &str,
    name: &str,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("{}: {e}", ca_path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca_path.display()))?;
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let (end_entity, intermediates) = chain.split_first().ok_or("no CERTIFICATE block")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(
            end_entity,
            intermediates,
            &server_name,
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| match e {
            rustls::Error::InvalidCertificate(c) => format!("{c:?}"),
            other => other.to_string(),
        })
}

/// The start-up check of a node's TLS files, before anything is created:
/// both names are valid DNS names and differ, `ca.pem`, `NAME.pem` and
/// `NAME.key` are readable, the key matches the certificate, and the
/// certificate is valid now for this node's name under `ca.pem`.
pub fn check_tls_files(files: &TlsFiles) -> Result<(), CertError> {
    check_node_name(&files.node_name)?;
    files.peer_server_name()?;
    if files.node_name == files.peer_name {
        return Err(CertError::SameName {
            name: files.node_name.clone(),
        });
    }
    // Builds both rustls configurations exactly as the agent will: every file is
    // read and parsed, and a key that does not match the certificate is refused.
    super::tls::client_config(files)?;
    super::tls::server_config(files)?;
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).map_err(|source| TransportError::CertFileRead {
            path: path.clone(),
            source,
        })
    };
    let ca_pem = read(files.ca_path())?;
    let cert_pem = read(files.cert_path())?;
    verify_node_cert(&files.ca_path(), &ca_pem, &cert_pem, &files.node_name).map_err(|reason| {
        CertError::NodeCertificate {
            cert: files.cert_path(),
            ca: files.ca_path(),
            name: files.node_name.clone(),
            reason,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_ca_and_node_files_with_private_keys_0600_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        generate_certs(&out, &["alpha", "beta"]).unwrap();
        assert_eq!(mode(&out), 0o700, "the TLS directory holds keys");
        for (file, m) in [
            ("ca.pem", 0o644),
            ("ca.key", 0o600),
            ("alpha.pem", 0o644),
            ("alpha.key", 0o600),
            ("beta.pem", 0o644),
            ("beta.key", 0o600),
        ] {
            let path = out.join(file);
            assert_eq!(mode(&path), m, "{file}");
            assert!(std::fs::metadata(&path).unwrap().len() > 100, "{file}");
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

    /// The validity window in the certificate itself, read back with x509-parser.
    fn window(path: &Path) -> (i64, i64) {
        let pem = std::fs::read_to_string(path).unwrap();
        let params = CertificateParams::from_ca_cert_pem(&pem).unwrap();
        (
            params.not_before.unix_timestamp(),
            params.not_after.unix_timestamp(),
        )
    }

    #[test]
    fn validity_starts_a_day_ago_and_lasts_the_years_asked() {
        let dir = tempfile::tempdir().unwrap();
        generate_certs_valid_for(dir.path(), &["alpha"], 3).unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        for file in ["ca.pem", "alpha.pem"] {
            let (from, to) = window(&dir.path().join(file));
            let day = 86_400;
            assert!((now - from - day).abs() < 120, "{file}: not before {from}");
            let years = (to - now) as f64 / (365.2425 * day as f64);
            assert!((years - 3.0).abs() < 0.01, "{file}: {years} years");
        }
        assert!(matches!(
            generate_certs_valid_for(&dir.path().join("x"), &["alpha"], 0),
            Err(CertError::ValidYears { years: 0 })
        ));
    }

    #[test]
    fn a_third_node_signed_by_the_existing_ca_verifies_and_renewal_keeps_the_old_pair() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        generate_certs_valid_for(&ca, &["alpha", "beta"], 2).unwrap();
        let out = dir.path().join("gamma");
        let signed = sign_node_cert(&ca, "gamma", &out, 10, false).unwrap();
        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(&signed.key), 0o600);
        assert!(signed.ca_copied.is_some(), "ca.pem copied into the new dir");
        let files = TlsFiles {
            dir: out.clone(),
            node_name: "gamma".into(),
            peer_name: "alpha".into(),
        };
        check_tls_files(&files).unwrap();
        // Never beyond the CA's own end.
        assert!(window(&signed.cert).1 <= window(&ca.join("ca.pem")).1);
        // Without --renew an existing pair is refused; with it, replaced and kept.
        let before = std::fs::read(&signed.cert).unwrap();
        assert!(matches!(
            sign_node_cert(&ca, "gamma", &out, 1, false),
            Err(CertError::Transport(TransportError::CertExists { .. }))
        ));
        let renewed = sign_node_cert(&ca, "gamma", &out, 1, true).unwrap();
        let (old_cert, old_key) = renewed.previous.expect("old pair kept");
        assert_eq!(std::fs::read(&old_cert).unwrap(), before);
        assert_eq!(mode(&old_key), 0o600);
        assert_ne!(std::fs::read(&renewed.cert).unwrap(), before);
        check_tls_files(&files).unwrap();
    }

    #[test]
    fn a_foreign_ca_key_or_a_wrong_certificate_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours");
        let theirs = dir.path().join("theirs");
        generate_certs(&ours, &["alpha", "beta"]).unwrap();
        generate_certs(&theirs, &["alpha", "beta"]).unwrap();
        // ca.key of another CA: nothing written.
        let mixed = dir.path().join("mixed");
        std::fs::create_dir(&mixed).unwrap();
        std::fs::copy(ours.join("ca.pem"), mixed.join("ca.pem")).unwrap();
        std::fs::copy(theirs.join("ca.key"), mixed.join("ca.key")).unwrap();
        let e = sign_node_cert(&mixed, "gamma", &mixed, 1, false).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
        assert!(!mixed.join("gamma.pem").exists());
        // A node certificate from another CA, or for another name.
        std::fs::copy(theirs.join("alpha.pem"), mixed.join("alpha.pem")).unwrap();
        std::fs::copy(theirs.join("alpha.key"), mixed.join("alpha.key")).unwrap();
        let files = TlsFiles {
            dir: mixed.clone(),
            node_name: "alpha".into(),
            peer_name: "beta".into(),
        };
        let e = check_tls_files(&files).unwrap_err();
        assert!(
            matches!(e, CertError::NodeCertificate { .. }) && e.to_string().contains("--ca"),
            "{e}"
        );
        let files = TlsFiles {
            dir: ours.clone(),
            node_name: "alpha".into(),
            peer_name: "alpha".into(),
        };
        assert!(matches!(
            check_tls_files(&files),
            Err(CertError::SameName { .. })
        ));
        let files = TlsFiles {
            dir: ours,
            node_name: "gamma".into(),
            peer_name: "alpha".into(),
        };
        let e = check_tls_files(&files).unwrap_err();
        assert!(e.to_string().contains("gamma.pem"), "{e}");
    }
}
