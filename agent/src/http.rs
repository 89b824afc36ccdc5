//! The agent's HTTP servers (`/metrics`, `/healthz` and `/livez`, the healthCheckNodePort
//! servers), on hyper's HTTP/1.1 server: a listener, and a handler that turns a request path
//! into a [`Reply`].
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, header, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinSet};

/// What a handler answers: status, content type and body; every answer also carries
/// `X-Content-Type-Options: nosniff`, as kube-proxy's do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, body: String) -> Self {
        Self { status, content_type: "application/json", body }
    }

    /// Go's `http.NotFound`, what kube-proxy's servers answer on other paths.
    pub fn not_found() -> Self {
        Self {
            status: 404,
            content_type: "text/plain; charset=utf-8",
            body: "404 page not found\n".into(),
        }
    }
}

/// Binds `addr` for the server named by `flag`; the error names both, e.g.
/// `--healthz-addr 0.0.0.0:10256: cannot listen: Address in use (os error 98); kube-proxy
/// (pid 812) listens on port 10256 ...`: for a port in use, the process holding it when this
/// process can see it, and what to do.
pub async fn bind(flag: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let mut msg = format!("{flag} {addr}: cannot listen: {e}");
        if e.kind() == std::io::ErrorKind::AddrInUse {
            let port = addr.port();
            match port_holders(port).first() {
                Some((pid, name)) => msg += &format!("; {name} (pid {pid}) listens on port {port}"),
                None => msg += &format!("; another process listens on port {port}"),
            }
            msg += &format!(
                " (kube-proxy and other kproxy agents use the same default ports): stop it, or give {flag} another address"
            );
        }
        anyhow::anyhow!(msg)
    })
}

/// The processes (pid, command name) with a TCP socket listening on `port`, as far as this
/// process can see them (`/proc/net/tcp*` for the sockets, `/proc/*/fd` for their owners;
/// another PID namespace's processes are not visible).
pub fn port_holders(port: u16) -> Vec<(u32, String)> {
    const LISTEN: &str = "0A";
    let mut inodes = std::collections::BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next());
            if f.get(3) == Some(&LISTEN)
                && local_port.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
                && let Some(inode) = f.get(9).filter(|i| **i != "0")
            {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let mut holders = Vec::new();
    if inodes.is_empty() {
        return holders;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return holders };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| l.to_str().is_some_and(|l| inodes.contains(l)))
        });
        if holds {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            holders.push((pid, name.trim().to_owned()));
        }
    }
    holders
}

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers every request on `listener` with `handler(path)` until the returned future is
/// dropped (which also closes the connections it serves).
pub async fn serve<F>(listener: TcpListener, handler: F)
where
    F: Fn(&str) -> Reply + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let mut connections = JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::debug!(error = %e, "accepting an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let handler = handler.clone();
        connections.spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let reply = handler(req.uri().path());
                async move { Ok::<_, Infallible>(response(reply)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(reply.body)));
    *r.status_mut() = hyper::StatusCode::from_u16(reply.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(reply.content_type));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    r
}

#[cfg(test)]
pub(crate) mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Sends `request` to `addr` and returns the whole answer (the server closes: `Connection:
    /// close` is in every test request).
    pub(crate) async fn raw(addr: SocketAddr, request: &str) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// `GET path` on `addr`.
    pub(crate) async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        raw(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await
    }

    #[tokio::test]
    async fn answers_with_headers_and_closes_with_the_server() {
        let listener = bind("--test-addr", "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, |path| match path {
            "/x" => Reply::json(503, "{}".into()),
            _ => Reply::not_found(),
        }));
        let r = get(addr, "/x?verbose=1").await.unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("content-type: application/json\r\n"), "{r}");
        assert!(r.contains("x-content-type-options: nosniff\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n{}"), "{r}");
        let r = get(addr, "/other").await.unwrap();
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n") && r.ends_with("404 page not found\n"));
        // HTTP/1.0 clients (the benchmark's) get an answer too.
        let r = raw(addr, "GET /x HTTP/1.0\r\n\r\n").await.unwrap();
        assert!(r.starts_with("HTTP/1.0 503 "), "{r}");
        // HEAD: headers only.
        let r =
            raw(addr, "HEAD /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        assert!(r.ends_with("\r\n\r\n"), "{r}");
        // A port already in use is an error naming the flag, the address and who holds it.
        let e = bind("--healthz-addr", addr).await.unwrap_err().to_string();
        assert!(e.starts_with(&format!("--healthz-addr {addr}: cannot listen: ")), "{e}");
        let me = std::process::id();
        assert!(e.contains(&format!(" (pid {me}) listens on port {}", addr.port())), "{e}");
        assert!(e.ends_with("stop it, or give --healthz-addr another address"), "{e}");
        server.abort();
        let _ = server.await;
        assert!(get(addr, "/x").await.is_err(), "still listening after the server stopped");
    }
}
