//! The HTTP listener over TLS (as the Kubernetes API aggregator reaches it). `tests/tls/` holds a
//! test CA (`ca.pem`, its key discarded) and a server certificate it signed for
//! localhost/127.0.0.1 (`cert.pem`, `key.pem`; EC P-256, valid 100 years), made with
//! `openssl req -x509` (CA) and `openssl x509 -req` (leaf, `basicConstraints=CA:FALSE`).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{http_get, Env};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use taskbus_proto::PoolSettings;
use taskbus_runtime::CancellationToken;
use taskbus_scaler::tls::TlsFiles;
use taskbus_scaler::ScalerError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn dir() -> PathBuf {
    common::manifest_dir().join("tests/tls")
}

fn files() -> TlsFiles {
    TlsFiles {
        cert: dir().join("cert.pem"),
        key: dir().join("key.pem"),
    }
}

async fn https_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir().join("ca.pem")).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the scaler");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_metrics_api_over_tls() {
    let env = Env::start().await;
    env.pool("cpu", &PoolSettings::default()).await;
    env.publish("cpu", 3).await;
    let mut config = env.config();
    config.http_tls = Some(files());
    let shutdown = CancellationToken::new();
    let running = taskbus_scaler::start(config, shutdown.clone())
        .await
        .unwrap();

    let disc = https_get(running.http_addr, "/apis/external.metrics.k8s.io/v1beta1").await;
    assert!(disc.starts_with("HTTP/1.1 200"), "{disc}");
    assert!(disc.contains("APIResourceList"), "{disc}");
    let v = https_get(
        running.http_addr,
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/taskbus-pending?labelSelector=pool%3Dcpu",
    )
    .await;
    assert!(v.contains(r#""value":"3""#), "{v}");

    // Plain HTTP on the TLS port is refused, and the server keeps serving.
    let (code, _) = http_get(running.http_addr, "/healthz").await;
    assert_ne!(code, 200);
    let ok = https_get(running.http_addr, "/healthz").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_are_refused_with_the_path() {
    let env = Env::start().await;
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), "not a pem file\n").unwrap();
    let cases = [
        (
            TlsFiles {
                cert: dir().join("missing.pem"),
                key: dir().join("key.pem"),
            },
            "missing.pem",
        ),
        (
            TlsFiles {
                cert: garbage.path().into(),
                key: dir().join("key.pem"),
            },
            "no CERTIFICATE block",
        ),
        (
            TlsFiles {
                cert: dir().join("cert.pem"),
                key: garbage.path().into(),
            },
            "private key",
        ),
        // The certificate given as the key.
        (
            TlsFiles {
                cert: dir().join("cert.pem"),
                key: dir().join("cert.pem"),
            },
            "private key",
        ),
    ];
    for (files, want) in cases {
        let mut config = env.config();
        config.http_tls = Some(files.clone());
        let err = match taskbus_scaler::start(config, CancellationToken::new()).await {
            Err(e) => e,
            Ok(_) => panic!("{files:?} accepted"),
        };
        assert!(matches!(err, ScalerError::Tls(_)), "{err}");
        assert!(err.to_string().contains(want), "{files:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls() {
    use taskbus_scaler::pb::external_scaler_client::ExternalScalerClient;
    use taskbus_scaler::pb::ScaledObjectRef;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    let env = Env::start().await;
    env.pool("cpu", &PoolSettings::default()).await;
    env.publish("cpu", 2).await;
    let mut config = env.config();
    config.grpc_tls = Some(files());
    let shutdown = CancellationToken::new();
    let running = taskbus_scaler::start(config, shutdown.clone())
        .await
        .unwrap();
    let sref = ScaledObjectRef {
        name: "a".into(),
        namespace: "default".into(),
        scaler_metadata: [("pool".to_string(), "cpu".to_string())].into(),
    };

    let ca = Certificate::from_pem(std::fs::read(dir().join("ca.pem")).unwrap());
    let tls = ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", running.grpc_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connection to the gRPC server");
    let mut c = ExternalScalerClient::new(channel);
    assert!(c.is_active(sref.clone()).await.unwrap().into_inner().result);

    // A plaintext client cannot talk to it.
    let plain = ExternalScalerClient::connect(format!("http://{}", running.grpc_addr)).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut p) => p.is_active(sref).await.is_err(),
    };
    assert!(refused, "plaintext gRPC must fail against the TLS listener");

    shutdown.cancel();
    running.wait().await;

    // Bad gRPC TLS files are refused before anything starts.
    let mut config = env.config();
    config.grpc_tls = Some(TlsFiles {
        cert: dir().join("cert.pem"),
        key: dir().join("nope.pem"),
    });
    let err = taskbus_scaler::start(config, CancellationToken::new())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("nope.pem"), "{err}");
}
