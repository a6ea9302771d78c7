//! The tests' own DNS: a small authoritative server on loopback that serves
//! fixed test names and records every question it is asked, and a client
//! that reports what a stub resolver would see (answer, reply source, peer).
use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME},
    },
};
use serde_json::{Value, json};

/// Where the tests' agents believe their DNS server is (their resolv.conf
/// names it): nothing listens there, only the kernel's steering answers.
pub const STUB: &str = "127.0.0.153:53";

/// The addresses in a `dns` probe's answer.
pub fn answers(v: &Value) -> Vec<String> {
    v["answers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// One record the server holds: `(name, ttl, data)`; data is an address or
/// `CNAME target`.
pub type ZoneRecord = (&'static str, u32, &'static str);

/// A DNS server on a loopback address (UDP and TCP, same port).
pub struct DnsServer {
    pub addr: SocketAddr,
    asked: Arc<Mutex<Vec<(String, &'static str)>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

type Zone = HashMap<String, Vec<(u32, RData)>>;

fn zone(records: &[ZoneRecord]) -> Zone {
    let mut z: Zone = HashMap::new();
    for (name, ttl, data) in records {
        let rdata = match data.strip_prefix("CNAME ") {
            Some(target) => RData::CNAME(CNAME(Name::from_ascii(target).expect("cname target"))),
            None => match data.parse::<IpAddr>().expect("zone address") {
                IpAddr::V4(a) => RData::A(A(a)),
                IpAddr::V6(a) => RData::AAAA(AAAA(a)),
            },
        };
        z.entry(name.to_ascii_lowercase())
            .or_default()
            .push((*ttl, rdata));
    }
    z
}

/// The answer for one query: the name's records of the asked type, or its
/// CNAME alone (as an authoritative server for another zone would: the
/// resolver has to ask for the target itself).
fn respond(zone: &Zone, bytes: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(bytes).ok()?;
    let q = query.queries.first()?.clone();
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.add_query(q.clone());
    let key = q.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    match zone.get(&key) {
        None => reply.metadata.response_code = ResponseCode::NXDomain,
        Some(records) => {
            for (ttl, data) in records {
                let matches =
                    data.record_type() == q.query_type || data.record_type() == RecordType::CNAME;
                if matches {
                    reply.add_answer(Record::from_rdata(q.name.clone(), *ttl, data.clone()));
                }
            }
        }
    }
    reply.to_vec().ok()
}

/// A UDP socket and a TCP listener on the same free port. The kernel picks
/// the UDP port; that port may be taken for TCP (another test's connection
/// uses it as its local port), so try a bounded number of times.
fn bind_pair(ip: &str) -> (UdpSocket, TcpListener, SocketAddr) {
    let mut last = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind((ip, 0)).expect("bind test dns (udp)");
        let addr = udp.local_addr().expect("addr");
        match TcpListener::bind(addr) {
            Ok(tcp) => return (udp, tcp, addr),
            Err(e) => last = Some(e),
        }
    }
    panic!("no port free for both UDP and TCP on {ip} in 50 tries: {last:?}");
}

impl DnsServer {
    /// Serves `records` on `ip` (a free port).
    pub fn start(ip: &str, records: &[ZoneRecord]) -> Self {
        let (udp, tcp, addr) = bind_pair(ip);
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        tcp.set_nonblocking(true).expect("nonblocking");
        let zone = Arc::new(zone(records));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let note = |asked: &Mutex<Vec<(String, &'static str)>>, bytes: &[u8], t| {
            if let Ok(m) = Message::from_vec(bytes)
                && let Some(q) = m.queries.first()
            {
                let name = q.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
                asked.lock().unwrap().push((name, t));
            }
        };
        let udp_thread = {
            let (zone, asked, stop) = (zone.clone(), asked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    note(&asked, &buf[..n], "udp");
                    if let Some(reply) = respond(&zone, &buf[..n]) {
                        let _ = udp.send_to(&reply, peer);
                    }
                }
            })
        };
        let tcp_thread = {
            let (zone, asked, stop) = (zone, asked.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    s.set_nonblocking(false).ok();
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                    while let Some(bytes) = read_framed(&mut s) {
                        note(&asked, &bytes, "tcp");
                        let Some(reply) = respond(&zone, &bytes) else {
                            break;
                        };
                        if write_framed(&mut s, &reply).is_err() {
                            break;
                        }
                    }
                }
            })
        };
        Self {
            addr,
            asked,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    /// Every (name, transport) asked so far.
    pub fn asked(&self) -> Vec<(String, &'static str)> {
        self.asked.lock().unwrap().clone()
    }

    pub fn was_asked(&self, name: &str) -> bool {
        self.asked().iter().any(|(n, _)| n == name)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_framed(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).ok()?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).ok()?;
    Some(buf)
}

fn write_framed(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    s.write_all(&out)
}

/// A recursive query for `name` (`qtype`: A, AAAA or TXT), encoded.
pub fn query_bytes(name: &str, qtype: &str) -> Vec<u8> {
    let qtype = record_type(qtype);
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).expect("query name"),
        qtype,
    ));
    m.to_vec().expect("encode query")
}

fn record_type(qtype: &str) -> RecordType {
    match qtype {
        "AAAA" => RecordType::AAAA,
        "TXT" => RecordType::TXT,
        _ => RecordType::A,
    }
}

fn describe(reply: &[u8]) -> Value {
    match Message::from_vec(reply) {
        Ok(m) => {
            let answers: Vec<String> = m
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0.to_string()),
                    RData::AAAA(a) => Some(a.0.to_string()),
                    _ => None,
                })
                .collect();
            let ttls: Vec<u32> = m.answers.iter().map(|r| r.ttl).collect();
            json!({
                "ok": true,
                "id": m.metadata.id,
                "rcode": u16::from(m.metadata.response_code),
                "answers": answers,
                "ttls": ttls,
            })
        }
        Err(e) => json!({"ok": false, "errno": -1, "error": format!("bad reply: {e}")}),
    }
}

fn failed(e: std::io::Error) -> Value {
    json!({"ok": false, "errno": e.raw_os_error().unwrap_or(-1), "error": e.to_string()})
}

/// One query as a stub would send it. `how`: `udp` (connected socket, like
/// glibc), `udp-unconnected` (sendto/recvfrom) or `tcp`. Reports the answer,
/// the reply's source address and the socket's peer.
pub fn query(server: SocketAddr, name: &str, qtype: &str, how: &str) -> Value {
    let bytes = query_bytes(name, qtype);
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let wait = Some(Duration::from_secs(3));
    let mut buf = [0u8; 4096];
    match how {
        "tcp" => {
            let mut s = match TcpStream::connect_timeout(&server, Duration::from_secs(3)) {
                Ok(s) => s,
                Err(e) => return failed(e),
            };
            s.set_read_timeout(wait).ok();
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            if let Err(e) = write_framed(&mut s, &bytes) {
                return failed(e);
            }
            let Some(reply) = read_framed(&mut s) else {
                return json!({"ok": false, "errno": -1, "error": "no reply", "peer": peer});
            };
            let mut v = describe(&reply);
            v["peer"] = json!(peer);
            v
        }
        _ => {
            let sock = match UdpSocket::bind(local) {
                Ok(s) => s,
                Err(e) => return failed(e),
            };
            sock.set_read_timeout(wait).ok();
            let connected = how == "udp";
            let sent = if connected {
                sock.connect(server).and_then(|()| sock.send(&bytes))
            } else {
                sock.send_to(&bytes, server)
            };
            if let Err(e) = sent {
                return failed(e);
            }
            let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let mut v = describe(&buf[..n]);
                    v["from"] = json!(from.to_string());
                    v["peer"] = json!(peer);
                    v
                }
                Err(e) => failed(e),
            }
        }
    }
}
