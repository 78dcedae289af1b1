//! The connection to one bucket: the `object_store` crate's S3 client, driven from the
//! executor's channel threads through a small tokio runtime, with the request timeout and the
//! fault seam in one HTTP wrapper ([`Seam`]) under the client's retry policy.

use std::io;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService, ReqwestConnector,
};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion,
};

use super::{StoreOptions, StoreUrl};
use crate::error::Op;
use crate::fault::{self, Injected};

/// The client of one bucket (see the module docs). Cheap to share by reference between
/// channel threads: every call blocks the calling thread until its request is done.
pub(crate) struct Client {
    store: AmazonS3,
    runtime: tokio::runtime::Runtime,
    pub url: StoreUrl,
}

/// An object that exists: its bytes and its entity tag (for a conditional replace).
pub(crate) struct Fetched {
    pub bytes: Bytes,
    pub e_tag: Option<String>,
}

impl Client {
    /// Connects to `url`'s bucket with the endpoint, region and credentials of the usual
    /// `AWS_*` environment variables (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION`
    /// or `AWS_REGION`, `AWS_ALLOW_HTTP`), path-style addressing unless
    /// `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`.
    pub fn connect(url: &StoreUrl, opts: &StoreOptions) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mapped-ram-s3")
            .enable_all()
            .build()?;
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&url.bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: opts.retries,
                retry_timeout: opts.retry_timeout,
            })
            // Replaces the options `from_env` read: `AWS_ALLOW_HTTP` is read again here.
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(
                        env_true("AWS_ALLOW_HTTP")
                            || opts
                                .endpoint
                                .as_deref()
                                .is_some_and(|e| e.starts_with("http://")),
                    )
                    .with_connect_timeout(opts.request_timeout.min(Duration::from_secs(10)))
                    .with_pool_max_idle_per_host(opts.channels.max(1) * 2),
            )
            .with_http_connector(SeamConnector {
                timeout: opts.request_timeout,
            });
        if std::env::var_os("AWS_VIRTUAL_HOSTED_STYLE_REQUEST").is_none() {
            builder = builder.with_virtual_hosted_style_request(false);
        }
        if std::env::var_os("AWS_DEFAULT_REGION").is_none() {
            if let Some(region) = std::env::var_os("AWS_REGION") {
                builder = builder.with_region(region.to_string_lossy());
            }
        }
        if let Some(endpoint) = &opts.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some((key, secret)) = &opts.credentials {
            builder = builder
                .with_access_key_id(key)
                .with_secret_access_key(secret);
        }
        if let Some(region) = &opts.region {
            builder = builder.with_region(region);
        }
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT").ok());
        let unsigned = opts.unsigned_payload.unwrap_or_else(|| {
            match std::env::var("AWS_UNSIGNED_PAYLOAD") {
                Ok(v) => v.eq_ignore_ascii_case("true"),
                // As the AWS SDKs do: TLS protects the payload; plain http has only the
                // signature.
                Err(_) => !endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            }
        });
        builder = builder.with_unsigned_payload(unsigned);
        let store = builder.build().map_err(|e| other(&url.display(), e))?;
        Ok(Self {
            store,
            runtime,
            url: url.clone(),
        })
    }

    fn path(&self, key: &str) -> ObjectPath {
        ObjectPath::from(key)
    }

    fn name(&self, key: &str) -> String {
        format!("s3://{}/{}", self.url.bucket, key)
    }

    /// `PUT` of a whole object.
    pub fn put(&self, key: &str, body: Bytes) -> io::Result<()> {
        let path = self.path(key);
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(body)))
            .map(|_| ())
            .map_err(|e| convert(&self.name(key), e))
    }

    /// `PUT` that only succeeds if the object is still what the caller saw: absent
    /// (`e_tag` `None`) or with this entity tag. A lost race is an error of kind
    /// `AlreadyExists`.
    pub fn put_if(&self, key: &str, body: Bytes, e_tag: Option<&str>) -> io::Result<()> {
        let path = self.path(key);
        let mode = match e_tag {
            None => PutMode::Create,
            Some(tag) => PutMode::Update(UpdateVersion {
                e_tag: Some(tag.to_string()),
                version: None,
            }),
        };
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        self.runtime
            .block_on(self.store.put_opts(&path, PutPayload::from(body), opts))
            .map(|_| ())
            .map_err(|e| convert(&self.name(key), e))
    }

    /// `GET` of a whole object; `None` when there is none.
    pub fn get(&self, key: &str) -> io::Result<Option<Fetched>> {
        let path = self.path(key);
        let result = self.runtime.block_on(async {
            let got = self.store.get(&path).await?;
            let e_tag = got.meta.e_tag.clone();
            let bytes = got.bytes().await?;
            Ok::<_, object_store::Error>(Fetched { bytes, e_tag })
        });
        match result {
            Ok(f) => Ok(Some(f)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(convert(&self.name(key), e)),
        }
    }

    /// Ranged `GET` of bytes `range` of an object; exactly that many bytes or an error.
    pub fn get_range(&self, key: &str, range: Range<u64>) -> io::Result<Bytes> {
        let path = self.path(key);
        let want = range.end - range.start;
        let bytes = self
            .runtime
            .block_on(self.store.get_range(&path, range.clone()))
            .map_err(|e| convert(&self.name(key), e))?;
        if bytes.len() as u64 != want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: bytes {}..{} came back as {} bytes",
                    self.name(key),
                    range.start,
                    range.end,
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    /// The keys (and sizes) under `prefix`.
    pub fn list(&self, prefix: &str) -> io::Result<Vec<(String, u64)>> {
        let path = self.path(prefix);
        self.runtime
            .block_on(async {
                self.store
                    .list(Some(&path))
                    .map_ok(|m| (m.location.to_string(), m.size))
                    .try_collect::<Vec<_>>()
                    .await
            })
            .map_err(|e| convert(&self.name(prefix), e))
    }

    /// Deletes `keys` (a missing one is not an error).
    pub fn delete(&self, keys: &[String]) -> io::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let paths: Vec<object_store::Result<ObjectPath>> =
            keys.iter().map(|k| Ok(self.path(k))).collect();
        let name = self.name(&keys[0]);
        self.runtime
            .block_on(async {
                let stream = futures_util::stream::iter(paths);
                let mut results = self.store.delete_stream(Box::pin(stream));
                while let Some(r) = results.try_next().await.transpose() {
                    match r {
                        Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })
            .map_err(|e| convert(&name, e))
    }
}

/// Whether the environment variable `name` says true.
fn env_true(name: &str) -> bool {
    std::env::var(name)
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// An `object_store` error as an `io::Error` that names the object.
fn convert(name: &str, e: object_store::Error) -> io::Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. } => {
            io::ErrorKind::AlreadyExists
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{name}: {e}"))
}

fn other(name: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{name}: {e}"))
}

/// Makes the HTTP client: `reqwest` (the crate's own), wrapped in a [`Seam`].
#[derive(Debug)]
struct SeamConnector {
    timeout: Duration,
}

impl HttpConnector for SeamConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Seam {
            inner,
            timeout: self.timeout,
        }))
    }
}

/// Every HTTP request of the store passes here, *under* the client's retry policy: the fault
/// hook is asked first (an injected 503, delay or reset meets the retries exactly as a real
/// one would), then the request runs with its timeout (headers and body together).
#[derive(Debug)]
struct Seam {
    inner: HttpClient,
    timeout: Duration,
}

fn op_of(req: &HttpRequest) -> Op {
    match *req.method() {
        http::Method::PUT => Op::StorePut,
        http::Method::HEAD => Op::StoreHead,
        http::Method::DELETE | http::Method::POST => Op::StoreDelete,
        _ if req.uri().query().is_some_and(|q| q.contains("list-type")) => Op::StoreList,
        _ => Op::StoreGet,
    }
}

#[async_trait]
impl HttpService for Seam {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let op = op_of(&req);
        let mut delay = Duration::ZERO;
        match fault::check(op) {
            None | Some(Injected::Short(_)) => {}
            Some(Injected::Status(code)) => {
                let status = http::StatusCode::from_u16(code)
                    .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
                let mut response = HttpResponse::new(HttpResponseBody::from(format!(
                    "<Error><Code>Injected</Code><Message>fault injected: {code}</Message></Error>"
                )));
                *response.status_mut() = status;
                return Ok(response);
            }
            Some(Injected::Reset) => {
                return Err(HttpError::new(
                    HttpErrorKind::Request,
                    io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "connection reset (injected)",
                    ),
                ));
            }
            Some(Injected::Fail(e)) => return Err(HttpError::new(HttpErrorKind::Request, e)),
            Some(Injected::Interrupt) => {
                return Err(HttpError::new(
                    HttpErrorKind::Interrupted,
                    io::Error::from(io::ErrorKind::Interrupted),
                ))
            }
            Some(Injected::Delay(d)) => delay = d,
        }
        let timeout = self.timeout;
        let work = async {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let response = self.inner.execute(req).await?;
            // Read the body inside the timeout too: a gateway that stalls mid-body is as slow
            // as one that never answers.
            let (parts, body) = response.into_parts();
            let bytes = body.bytes().await?;
            Ok::<_, HttpError>(HttpResponse::from_parts(
                parts,
                HttpResponseBody::from(bytes),
            ))
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::new(
                HttpErrorKind::Timeout,
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no complete answer within {timeout:?}"),
                ),
            )),
        }
    }
}
