//! TLS for the gRPC transport: server and client configuration (PEM, from memory or files),
//! optional mutual TLS, and self-signed development certificates.
//!
//! rustls runs with the *ring* crypto provider. [`serve`](crate::grpc::serve) and
//! [`GrpcClient::connect`](crate::grpc::GrpcClient::connect) call [`install_crypto_provider`]
//! themselves, so no caller has to, and a binary that also links rustls' aws-lc provider (through
//! another dependency) does not panic for want of a process-wide default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::NetError;

/// How long the server waits for a TLS handshake before dropping the connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Make rustls' *ring* provider the process-wide default, unless a default is already installed.
/// Idempotent and cheap; called by the transport's entry points.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err means another thread installed one in between: that one is used, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The server's TLS identity (PEM), and optionally the CA whose client certificates it requires.
#[derive(Clone)]
pub struct ServerTls {
    /// Certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// Private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &format_args!("***"))
            .field("mutual_tls", &self.client_ca_pem.is_some())
            .finish()
    }
}

impl ServerTls {
    /// Read and check the PEM files: certificate chain, private key, optional client CA.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, NetError> {
        let cert_pem = read_certs(cert, "server certificate")?;
        let key_pem = read_key(key, "server private key")?;
        let client_ca_pem = client_ca.map(|p| read_certs(p, "client CA certificate")).transpose()?;
        Ok(Self { cert_pem, key_pem, client_ca_pem })
    }

    /// The server identity of [`generate_dev_certs`]; with `mutual`, clients need the dev client certificate.
    pub fn from_dev_certs(paths: &CertPaths, mutual: bool) -> Result<Self, NetError> {
        Self::from_files(&paths.server_cert, &paths.server_key, mutual.then_some(paths.ca_cert.as_path()))
    }

    pub(crate) fn to_tonic(&self) -> Result<ServerTlsConfig, NetError> {
        check_certs(&self.cert_pem, "ServerTls::cert_pem")?;
        check_key(&self.key_pem, "ServerTls::key_pem")?;
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca_pem {
            check_certs(ca, "ServerTls::client_ca_pem")?;
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(config)
    }
}

/// What a client trusts (PEM), the name it expects on the server's certificate, and optionally
/// its own identity for mutual TLS.
#[derive(Clone)]
pub struct ClientTls {
    /// CA certificate(s) the server's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// Name checked against the server certificate ("localhost", a DNS name or an IP address).
    pub domain: String,
    /// Client certificate chain and private key, for servers that require mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("domain", &self.domain)
            .field("identity", &self.identity.as_ref().map(|_| "***"))
            .finish()
    }
}

impl ClientTls {
    /// Read and check the PEM files: trusted CA, and optionally (certificate, key) for mutual TLS.
    pub fn from_files(
        ca: &Path,
        domain: impl Into<String>,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Self, NetError> {
        let ca_pem = read_certs(ca, "CA certificate")?;
        let identity = identity
            .map(|(cert, key)| {
                Ok::<_, NetError>((read_certs(cert, "client certificate")?, read_key(key, "client private key")?))
            })
            .transpose()?;
        Ok(Self { ca_pem, domain: domain.into(), identity })
    }

    /// Trust the CA of [`generate_dev_certs`] and present its client certificate (harmless when the
    /// server does not ask for one).
    pub fn from_dev_certs(paths: &CertPaths, domain: impl Into<String>) -> Result<Self, NetError> {
        Self::from_files(&paths.ca_cert, domain, Some((&paths.client_cert, &paths.client_key)))
    }

    pub(crate) fn to_tonic(&self) -> Result<ClientTlsConfig, NetError> {
        check_certs(&self.ca_pem, "ClientTls::ca_pem")?;
        if self.domain.is_empty() {
            return Err(NetError::Tls {
                context: "ClientTls::domain".into(),
                reason: "expected the server's name, found an empty string".into(),
            });
        }
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(self.domain.clone())
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some((cert, key)) = &self.identity {
            check_certs(cert, "ClientTls::identity certificate")?;
            check_key(key, "ClientTls::identity key")?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        Ok(config)
    }
}

/// Where [`generate_dev_certs`] wrote its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// The development CA: clients trust `ca_cert`; `ca_key` signs the others.
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// The server's certificate (valid for the requested hosts) and key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate for mutual TLS (CN "hetfed-client") and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Create a development CA (`ca.pem`, `ca.key`), a server certificate signed by it for `hosts`
/// (`server.pem`, `server.key`; "localhost" and the IP SAN 127.0.0.1 when `hosts` is empty; entries
/// that parse as IP addresses become IP SANs) and a client certificate for mutual TLS
/// (`client.pem`, `client.key`) in `dir`, which is created if needed. Key files get mode 0600 on
/// unix. Existing files are overwritten. For tests and trials, not for production.
pub fn generate_dev_certs(dir: &Path, hosts: &[String]) -> Result<CertPaths, NetError> {
    let gen = |e: rcgen::Error| NetError::CertGen(e.to_string());
    std::fs::create_dir_all(dir).map_err(|source| NetError::Write {
        what: "certificate directory",
        path: dir.to_path_buf(),
        source,
    })?;
    let hosts: Vec<String> =
        if hosts.is_empty() { vec!["localhost".into(), "127.0.0.1".into()] } else { hosts.to_vec() };

    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "hetfed development CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |sans: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| -> Result<(String, String), NetError> {
        let key = KeyPair::generate().map_err(gen)?;
        let mut params =
            CertificateParams::new(sans).map_err(|e| NetError::CertGen(format!("{e} (hosts: {hosts:?})")))?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).map_err(gen)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf(hosts.clone(), &hosts[0], ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client_pem, client_key) =
        leaf(vec!["hetfed-client".into()], "hetfed-client", ExtendedKeyUsagePurpose::ClientAuth)?;

    let paths = CertPaths {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    write_file(&paths.ca_cert, "CA certificate", &ca_cert.pem(), false)?;
    write_file(&paths.ca_key, "CA private key", &ca_key_pem, true)?;
    write_file(&paths.server_cert, "server certificate", &server_pem, false)?;
    write_file(&paths.server_key, "server private key", &server_key, true)?;
    write_file(&paths.client_cert, "client certificate", &client_pem, false)?;
    write_file(&paths.client_key, "client private key", &client_key, true)?;
    Ok(paths)
}

fn write_file(path: &Path, what: &'static str, text: &str, secret: bool) -> Result<(), NetError> {
    use std::io::Write;
    let err = |source| NetError::Write { what, path: path.to_path_buf(), source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        // `mode` applies only to new files: tighten an existing one before writing the key into it.
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
    }
    #[cfg(not(unix))]
    let _ = secret;
    options.open(path).and_then(|mut f| f.write_all(text.as_bytes())).map_err(err)
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, NetError> {
    std::fs::read(path).map_err(|source| NetError::Read { what, path: path.to_path_buf(), source })
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<u8>, NetError> {
    let pem = read_file(path, what)?;
    check_certs(&pem, &format!("{what} file {}", path.display()))?;
    Ok(pem)
}

fn read_key(path: &Path, what: &'static str) -> Result<Vec<u8>, NetError> {
    let pem = read_file(path, what)?;
    check_key(&pem, &format!("{what} file {}", path.display()))?;
    Ok(pem)
}

/// At least one well-formed `CERTIFICATE` PEM block.
fn check_certs(pem: &[u8], origin: &str) -> Result<(), NetError> {
    let bad = |found: String| NetError::Pem {
        expected: "PEM certificate(s) (-----BEGIN CERTIFICATE-----)",
        origin: origin.to_owned(),
        found,
    };
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| bad(e.to_string()))?;
        n += 1;
    }
    if n == 0 {
        return Err(bad(format!("no certificate in {} bytes", pem.len())));
    }
    Ok(())
}

/// One well-formed private key PEM block (PKCS#8, PKCS#1 or SEC1).
fn check_key(pem: &[u8], origin: &str) -> Result<(), NetError> {
    PrivateKeyDer::from_pem_slice(pem).map(drop).map_err(|e| NetError::Pem {
        expected: "a PEM private key (PKCS#8, PKCS#1 or SEC1)",
        origin: origin.to_owned(),
        found: match e {
            rustls::pki_types::pem::Error::NoItemsFound => format!("no private key in {} bytes", pem.len()),
            e => e.to_string(),
        },
    })
}
