//! A throwaway PKI (CA, server certificate, client certificate) as PEM files in a temp dir.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Common name of the client certificate.
pub const CLIENT_CN: &str = "wnodes-test-client";

/// A CA plus a server certificate (SANs `127.0.0.1`, `localhost`) and one client certificate
/// (CN `wnodes-test-client`), written as PEM files into a temp dir that lives as long as this.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    ca_pem: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl TestPki {
    /// Generate the CA and both leaf certificates and write them out.
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("wnodes-pki-")
            .tempdir()
            .context("creating the PKI temp dir")?;

        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "wnodes-test-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)
            .context("self-signing the test CA")?;

        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "wnodes-test-server");
        server_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server_params
            .signed_by(&server_key, &ca)
            .context("signing the server certificate")?;

        let mut client_params = CertificateParams::new(Vec::<String>::new())?;
        client_params
            .distinguished_name
            .push(DnType::CommonName, CLIENT_CN);
        client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate()?;
        let client_cert = client_params
            .signed_by(&client_key, &ca)
            .context("signing the client certificate")?;

        let write = |name: &str, contents: String| -> anyhow::Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, contents)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        Ok(TestPki {
            ca_pem: write("ca.pem", ca.pem())?,
            server_cert: write("server.pem", server_cert.pem())?,
            server_key: write("server-key.pem", server_key.serialize_pem())?,
            client_cert: write("client.pem", client_cert.pem())?,
            client_key: write("client-key.pem", client_key.serialize_pem())?,
            dir,
        })
    }

    /// The directory holding all PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// CA certificate (PEM).
    pub fn ca_pem(&self) -> &Path {
        &self.ca_pem
    }

    /// Server certificate (PEM), SANs `127.0.0.1` and `localhost`.
    pub fn server_cert(&self) -> &Path {
        &self.server_cert
    }

    /// Server private key (PKCS#8 PEM).
    pub fn server_key(&self) -> &Path {
        &self.server_key
    }

    /// Client certificate (PEM), CN `wnodes-test-client`.
    pub fn client_cert(&self) -> &Path {
        &self.client_cert
    }

    /// Client private key (PKCS#8 PEM).
    pub fn client_key(&self) -> &Path {
        &self.client_key
    }

    /// nats-server config block:
    /// `tls { cert_file, key_file, ca_file, verify: <verify_clients>, timeout: 2 }`.
    /// With `verify_clients` the server demands a client certificate signed by the CA.
    pub fn nats_tls_block(&self, verify_clients: bool) -> String {
        let q = |p: &Path| serde_json::Value::String(p.display().to_string()).to_string();
        format!(
            "tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: {}\n  timeout: 2\n}}\n",
            q(&self.server_cert),
            q(&self.server_key),
            q(&self.ca_pem),
            verify_clients
        )
    }
}
