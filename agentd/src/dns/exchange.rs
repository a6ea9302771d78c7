//! Talking to the upstream servers and reading their answers (hickory-proto
//! does all DNS encoding and decoding).
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};

/// How long one upstream gets to answer before the next is asked.
const UDP_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_TIMEOUT: Duration = Duration::from_secs(4);
/// CNAME hops followed, in one answer and across follow-up queries.
const MAX_CHAIN: usize = 8;
/// Largest UDP answer read from an upstream.
const UDP_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("no upstream DNS server is configured ([dns] upstream, /etc/resolv.conf)")]
    NoUpstream,
    #[error("no upstream answered: {0}")]
    Unanswered(String),
    #[error("encoding the query: {0}")]
    Encode(String),
}

/// Asks the upstreams in order until one answers `query` (same question).
pub async fn ask(
    upstreams: &[SocketAddr],
    query: &Message,
    transport: Transport,
) -> Result<Message, ExchangeError> {
    if upstreams.is_empty() {
        return Err(ExchangeError::NoUpstream);
    }
    // A fresh id per upstream exchange: the agent's id is not ours to reuse.
    let mut out = query.clone();
    out.metadata.id = rand_id();
    let bytes = out
        .to_vec()
        .map_err(|e| ExchangeError::Encode(e.to_string()))?;
    let mut errors = Vec::new();
    for &server in upstreams {
        let reply = match transport {
            Transport::Udp => tokio::time::timeout(UDP_TIMEOUT, udp(server, &bytes, &out)).await,
            Transport::Tcp => tokio::time::timeout(TCP_TIMEOUT, tcp(server, &bytes, &out)).await,
        };
        match reply {
            Ok(Ok(m)) => return Ok(m),
            Ok(Err(e)) => errors.push(format!("{server}: {e}")),
            Err(_) => errors.push(format!("{server}: timed out")),
        }
    }
    Err(ExchangeError::Unanswered(errors.join("; ")))
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: writes at most b.len() bytes into b. getrandom(2) does not
    // fail for 2 bytes once the pool is ready; a predictable id would only
    // weaken spoofing resistance, not correctness.
    let _ = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u16::from_ne_bytes(b)
}

/// Whether `reply` answers `query`: same id and same question.
fn answers(reply: &Message, query: &Message) -> bool {
    reply.metadata.id == query.metadata.id && reply.queries == query.queries
}

async fn udp(server: SocketAddr, bytes: &[u8], query: &Message) -> std::io::Result<Message> {
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    sock.send(bytes).await?;
    let mut buf = vec![0u8; UDP_MAX];
    // Stray or spoofed datagrams are skipped; the caller's timeout bounds this.
    loop {
        let n = sock.recv(&mut buf).await?;
        if let Ok(m) = Message::from_vec(&buf[..n])
            && answers(&m, query)
        {
            return Ok(m);
        }
    }
}

async fn tcp(server: SocketAddr, bytes: &[u8], query: &Message) -> std::io::Result<Message> {
    let mut s = TcpStream::connect(server).await?;
    write_framed(&mut s, bytes).await?;
    let reply = read_framed(&mut s).await?;
    let m = Message::from_vec(&reply)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    if !answers(&m, query) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "answer does not match the question",
        ));
    }
    Ok(m)
}

/// DNS over TCP frames each message with its length (RFC 1035 4.2.2).
pub async fn read_framed<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let len = r.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

pub async fn write_framed<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(bytes.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "message too long"))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    w.write_all(&framed).await
}

/// The names `qname` leads to through the answer's CNAME records (itself
/// first), at most `MAX_CHAIN` hops.
fn chain(reply: &Message, qname: &Name) -> Vec<Name> {
    let mut names = vec![qname.clone()];
    while names.len() <= MAX_CHAIN {
        let last = names.last().cloned().unwrap_or_else(Name::root);
        let next = reply.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name == last => Some(target.0.clone()),
            _ => None,
        });
        match next {
            Some(n) if !names.contains(&n) => names.push(n),
            _ => break,
        }
    }
    names
}

/// Every A/AAAA address the answer gives for `qname` or a name its CNAME
/// chain leads to, with its TTL.
pub fn addresses(reply: &Message, qname: &Name) -> Vec<(IpAddr, u32)> {
    let names = chain(reply, qname);
    reply
        .answers
        .iter()
        .filter(|r| names.contains(&r.name))
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl)),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl)),
            _ => None,
        })
        .collect()
}

/// Asks for `query` and, when the answer's CNAME chain ends at a name it
/// gives no address for, asks for that name too and adds what comes back:
/// the agent gets one complete answer for the name it may resolve, and
/// never has to ask for the target (which its rules may not name).
pub async fn resolve(
    upstreams: &[SocketAddr],
    query: &Message,
    transport: Transport,
) -> Result<Message, ExchangeError> {
    let mut reply = ask(upstreams, query, transport).await?;
    let Some(q) = query.queries.first() else {
        return Ok(reply);
    };
    if !matches!(q.query_type, RecordType::A | RecordType::AAAA) {
        return Ok(reply);
    }
    for _ in 0..MAX_CHAIN {
        if reply.metadata.response_code != ResponseCode::NoError || reply.metadata.truncation {
            break;
        }
        let names = chain(&reply, &q.name);
        let Some(last) = names.last().filter(|_| names.len() > 1).cloned() else {
            break;
        };
        let has_data = reply
            .answers
            .iter()
            .any(|r| r.name == last && r.record_type() == q.query_type);
        if has_data {
            break;
        }
        let mut follow = query.clone();
        follow.queries = vec![Query::query(last, q.query_type)];
        let more = ask(upstreams, &follow, transport).await?;
        if more.answers.is_empty() {
            break;
        }
        reply.answers.extend(more.answers);
    }
    Ok(reply)
}

/// Cuts every TTL in the answer to `max` seconds: an agent must not cache
/// an address longer than agentd keeps it allowed.
pub fn clamp_ttls(reply: &mut Message, max: u32) {
    for r in reply
        .answers
        .iter_mut()
        .chain(reply.authorities.iter_mut())
        .chain(reply.additionals.iter_mut())
    {
        r.ttl = r.ttl.min(max);
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::OpCode,
        rr::{
            Record,
            rdata::{A, AAAA, CNAME},
        },
    };

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn addresses_follow_the_cname_chain_and_nothing_else() {
        let mut m = Message::response(1, OpCode::Query);
        let rec = |n: &str, ttl, data| Record::from_rdata(name(n), ttl, data);
        m.answers = vec![
            rec(
                "CRM.example.com.",
                60,
                RData::CNAME(CNAME(name("edge.cdn.test."))),
            ),
            rec("edge.cdn.test.", 30, RData::A(A([192, 0, 2, 1].into()))),
            rec(
                "edge.cdn.test.",
                30,
                RData::AAAA(AAAA("2001:db8::1".parse().unwrap())),
            ),
            // Not on the chain: an answer may not smuggle in other names.
            rec("evil.test.", 30, RData::A(A([203, 0, 113, 9].into()))),
            // A loop back to the start ends the walk.
            rec(
                "edge.cdn.test.",
                30,
                RData::CNAME(CNAME(name("crm.example.com."))),
            ),
        ];
        let got = addresses(&m, &name("crm.example.com."));
        assert_eq!(
            got,
            vec![
                ("192.0.2.1".parse().unwrap(), 30),
                ("2001:db8::1".parse().unwrap(), 30)
            ]
        );
        assert!(addresses(&m, &name("other.test.")).is_empty());

        clamp_ttls(&mut m, 45);
        assert!(m.answers.iter().all(|r| r.ttl <= 45));
        assert_eq!(m.answers[1].ttl, 30, "shorter TTLs are kept");
    }
}
