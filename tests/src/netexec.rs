//! `kproxy-netexec`: the lab's test server (in the spirit of agnhost netexec). It tells every
//! client who answered and who it saw: `NAME CLIENT_IP:CLIENT_PORT\n`.
//!
//! - TCP: reads one request line and answers with the line, then closes. An HTTP request line
//!   (`GET / HTTP/1.1`) gets its headers read and an `HTTP/1.0 200 OK` answer with the line as
//!   body. The request line `KEEP` makes the connection persistent: every line received
//!   (including `KEEP`) is answered until the client closes — for tests that check a connection
//!   stays on its backend. A client that closes its side without sending a line still gets the
//!   answer.
//! - UDP: every datagram is answered with the line.
//!
//! Bad input (over-long lines, idle clients) closes the connection after a bounded wait.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

/// Longest request line accepted (bytes).
pub const MAX_LINE: u64 = 4096;
/// How long a connection may stay idle before the server closes it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The request line that keeps a TCP connection open (one answer per line).
pub const KEEP_REQUEST: &str = "KEEP";

/// What the server listens on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Name put in every answer (the lab uses the pod name).
    pub name: String,
    /// Address to bind (usually 0.0.0.0).
    pub bind: Ipv4Addr,
    /// An IPv6 address to serve the same ports on as well (a dual-stack pod's IPv6 address).
    pub bind6: Option<Ipv6Addr>,
    /// TCP ports (0 = any free port).
    pub tcp_ports: Vec<u16>,
    /// UDP ports (0 = any free port).
    pub udp_ports: Vec<u16>,
}

/// The answer for a client: `NAME IP:PORT\n`.
pub fn reply_line(name: &str, peer: SocketAddr) -> String {
    format!("{name} {peer}\n")
}

/// A started server: its sockets are bound and served by background threads.
#[derive(Debug)]
pub struct Server {
    /// Bound TCP addresses, in the order of [`Config::tcp_ports`].
    pub tcp: Vec<SocketAddr>,
    /// Bound UDP addresses, in the order of [`Config::udp_ports`].
    pub udp: Vec<SocketAddr>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Server {
    /// Blocks until every serving thread ends (they end only if their socket fails).
    pub fn wait(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Binds every socket of `config` (failing if any bind fails), then serves them on threads.
pub fn serve(config: &Config) -> io::Result<Server> {
    // IPv6 first: a client that finds the IPv4 port open may rely on the IPv6 one too.
    let ips: Vec<IpAddr> =
        config.bind6.map(IpAddr::V6).into_iter().chain([IpAddr::V4(config.bind)]).collect();
    let mut listeners = Vec::new();
    let mut sockets = Vec::new();
    for &ip in &ips {
        for &port in &config.tcp_ports {
            let a = SocketAddr::new(ip, port);
            let l = TcpListener::bind(a)
                .map_err(|e| io::Error::new(e.kind(), format!("binding TCP {a}: {e}")))?;
            listeners.push(l);
        }
        for &port in &config.udp_ports {
            let a = SocketAddr::new(ip, port);
            let s = UdpSocket::bind(a)
                .map_err(|e| io::Error::new(e.kind(), format!("binding UDP {a}: {e}")))?;
            sockets.push(s);
        }
    }
    let mut server = Server { tcp: Vec::new(), udp: Vec::new(), threads: Vec::new() };
    for l in listeners {
        server.tcp.push(l.local_addr()?);
        let name = config.name.clone();
        server.threads.push(thread::spawn(move || accept_loop(&name, l)));
    }
    for s in sockets {
        server.udp.push(s.local_addr()?);
        let name = config.name.clone();
        server.threads.push(thread::spawn(move || udp_loop(&name, s)));
    }
    Ok(server)
}

fn accept_loop(name: &str, listener: TcpListener) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let name = name.to_owned();
                thread::spawn(move || {
                    if let Err(e) = handle_tcp(&name, stream, peer) {
                        eprintln!("netexec: tcp {peer}: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("netexec: accept: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn is_http_request_line(line: &str) -> bool {
    let mut parts = line.split_whitespace();
    let (Some(method), Some(_target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    method.chars().all(|c| c.is_ascii_uppercase()) && version.starts_with("HTTP/1.")
}

fn read_line_bounded(reader: &mut BufReader<TcpStream>, line: &mut String) -> io::Result<usize> {
    line.clear();
    let n = reader.by_ref().take(MAX_LINE).read_line(line)?;
    if n as u64 == MAX_LINE && !line.ends_with('\n') {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "request line too long"));
    }
    Ok(n)
}

fn handle_tcp(name: &str, stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let answer = reply_line(name, peer);
    let mut line = String::new();
    read_line_bounded(&mut reader, &mut line)?;
    let request = line.trim_end();
    if is_http_request_line(request) {
        // Skip the headers (bounded), then answer.
        for _ in 0..100 {
            if read_line_bounded(&mut reader, &mut line)? == 0 || line.trim_end().is_empty() {
                break;
            }
        }
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{answer}",
            answer.len()
        );
        writer.write_all(response.as_bytes())?;
    } else if request == KEEP_REQUEST {
        writer.write_all(answer.as_bytes())?;
        while read_line_bounded(&mut reader, &mut line)? > 0 {
            writer.write_all(answer.as_bytes())?;
        }
    } else {
        writer.write_all(answer.as_bytes())?;
    }
    writer.flush()
}

fn udp_loop(name: &str, socket: UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(e) = socket.send_to(reply_line(name, peer).as_bytes(), peer) {
                    eprintln!("netexec: udp reply to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("netexec: udp receive: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{Shutdown, TcpStream, UdpSocket},
        time::Duration,
    };

    use super::*;

    fn start() -> Server {
        serve(&Config {
            name: "pod-a".into(),
            bind: Ipv4Addr::LOCALHOST,
            bind6: None,
            tcp_ports: vec![0],
            udp_ports: vec![0],
        })
        .expect("serve")
    }

    fn read_all(mut s: TcpStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn tcp_line_names_server_and_client() {
        let srv = start();
        let mut s = TcpStream::connect(srv.tcp[0]).unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(b"hello\n").unwrap();
        assert_eq!(read_all(s), format!("pod-a {me}\n"));
    }

    #[test]
    fn tcp_half_close_without_line_is_answered() {
        let srv = start();
        let s = TcpStream::connect(srv.tcp[0]).unwrap();
        let me = s.local_addr().unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_all(s), format!("pod-a {me}\n"));
    }

    #[test]
    fn http_request_gets_http_response() {
        let srv = start();
        let mut s = TcpStream::connect(srv.tcp[0]).unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n").unwrap();
        let out = read_all(s);
        let body = format!("pod-a {me}\n");
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
        assert!(out.contains(&format!("Content-Length: {}\r\n", body.len())), "{out}");
        assert!(out.ends_with(&format!("\r\n\r\n{body}")), "{out}");
    }

    #[test]
    fn keep_answers_every_line() {
        let srv = start();
        let mut s = TcpStream::connect(srv.tcp[0]).unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(b"KEEP\n").unwrap();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        for _ in 0..3 {
            line.clear();
            std::io::BufRead::read_line(&mut r, &mut line).unwrap();
            assert_eq!(line, format!("pod-a {me}\n"));
            s.write_all(b"again\n").unwrap();
        }
    }

    #[test]
    fn overlong_line_closes_without_answer() {
        let srv = start();
        let mut s = TcpStream::connect(srv.tcp[0]).unwrap();
        s.write_all(&vec![b'x'; MAX_LINE as usize + 10]).unwrap();
        assert_eq!(read_all(s), "");
    }

    #[test]
    fn udp_datagrams_are_answered() {
        let srv = start();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let me = c.local_addr().unwrap();
        for _ in 0..2 {
            c.send_to(b"x", srv.udp[0]).unwrap();
            let mut buf = [0u8; 256];
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!(from, srv.udp[0]);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), format!("pod-a {me}\n"));
        }
    }
}
