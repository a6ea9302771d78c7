//! agentd's resolver, for agents with hostname rules.
//!
//! The kernel steers every DNS query such an agent sends to a socket of its
//! own here (`agentd-ebpf/src/steer.rs`), so the socket says which agent
//! asked. A name the agent's rules allow is asked of the upstream servers,
//! and every address in the answer is written to the agent's learned-address
//! map *before* the answer is released: the agent's first connect finds its
//! address allowed. Any other name gets the configured refusal and never
//! leaves the host. Every query is on the audit log.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use agentd_ebpf::ResolverPorts;
use tokio::{net::UdpSocket, sync::Semaphore, task::JoinHandle};

use crate::{
    config::{DnsConfig, HostRule},
    daemon::State,
    error::{IoContext as _, Result},
};

pub mod exchange;
pub mod learned;
pub mod names;
mod query;
pub mod saved;

use exchange::Transport;
use learned::Learned;
use names::HostMatcher;

/// An agent's hostname rules and their matcher, shared by its runtime.
#[derive(Debug, Default)]
pub struct HostRules {
    pub rules: Vec<HostRule>,
    pub matcher: HostMatcher,
}

impl HostRules {
    pub fn new(rules: &[HostRule]) -> Arc<Self> {
        Arc::new(Self {
            rules: rules.to_vec(),
            matcher: HostMatcher::new(rules),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// Queries one agent may have in flight over UDP; more are dropped (the
/// stub retries) rather than queued without bound.
const UDP_IN_FLIGHT: usize = 256;
/// TCP connections one agent may hold open to its resolver.
const TCP_CONNECTIONS: usize = 32;
/// An idle TCP connection is closed after this long.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How often expired learned addresses are swept from the map (the kernel
/// ignores them past their expiry in any case).
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// One agent's resolver sockets (tasks end when this is dropped).
struct Listeners {
    agent_id: u32,
    ports: ResolverPorts,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub struct Resolver {
    /// Lock order: `saving`, `learned`, then `State::agents`, then
    /// `State::maps`.
    pub learned: Mutex<Learned>,
    listeners: Mutex<HashMap<String, Listeners>>,
    /// Held while the learned names are snapshotted and written, so the
    /// file always ends with the newest snapshot. Taken before `learned`.
    saving: Mutex<()>,
    /// /etc/resolv.conf's nameservers, read at start.
    system_upstreams: Vec<SocketAddr>,
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new()
    }
}

impl Resolver {
    pub fn new() -> Self {
        Self::with_learned(Learned::default())
    }

    /// A resolver that starts from what was restored at start-up.
    pub fn with_learned(learned: Learned) -> Self {
        Self {
            learned: Mutex::new(learned),
            listeners: Mutex::new(HashMap::new()),
            saving: Mutex::new(()),
            system_upstreams: system_upstreams(),
        }
    }

    /// The servers names are asked of: `[dns] upstream`, else resolv.conf's.
    pub fn upstreams(&self, config: &DnsConfig) -> Vec<SocketAddr> {
        if config.upstream.is_empty() {
            self.system_upstreams.clone()
        } else {
            config.upstream.clone()
        }
    }

    pub fn learned(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.learned.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn system_upstreams() -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read("/etc/resolv.conf") else {
        return Vec::new();
    };
    let (conf, _) = resolv_conf::Config::parse_with_errors(&text);
    conf.nameservers
        .iter()
        .map(|ns| SocketAddr::new(IpAddr::from(ns), 53))
        .collect()
}

/// Gives every agent with hostname rules its resolver sockets and points
/// the kernel's steering at them; agents without (or no longer with) such
/// rules get no steering and their learned state is forgotten. Called at
/// start and after each reload.
pub fn sync(state: &Arc<State>) -> Result<()> {
    let wanted: Vec<(String, u32)> = state
        .agents
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|a| !a.hosts.is_empty())
        .map(|a| (a.name.clone(), a.agent_id))
        .collect();
    let mut listeners = state
        .dns
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let gone: Vec<String> = listeners
        .iter()
        .filter(|(name, l)| !wanted.contains(&((*name).clone(), l.agent_id)))
        .map(|(name, _)| name.clone())
        .collect();
    {
        let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
        for name in &gone {
            if let Some(l) = listeners.remove(name) {
                maps.set_resolver(l.agent_id, ResolverPorts::default())?;
            }
        }
        // The map is pinned: entries a previous daemon wrote (for agents
        // since changed, removed or contained) would steer DNS to a port
        // nobody here serves. Every agent id in the kernel that is not
        // served now gets no steering.
        let served: Vec<u32> = wanted.iter().map(|(_, id)| *id).collect();
        for entry in maps.agents()?.values() {
            if !served.contains(&entry.agent_id) {
                maps.set_resolver(entry.agent_id, ResolverPorts::default())?;
            }
        }
    }
    // After the maps lock is released: the learned lock comes first.
    for name in gone.iter().filter(|g| !wanted.iter().any(|(n, _)| n == *g)) {
        state.dns.learned().forget(name);
    }
    for (name, agent_id) in wanted {
        if !listeners.contains_key(&name) {
            let l = listen(state, &name, agent_id)?;
            listeners.insert(name.clone(), l);
        }
        let ports = listeners[&name].ports;
        state
            .maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_resolver(agent_id, ports)?;
    }
    Ok(())
}

/// Stops steering every agent's DNS to this daemon (it is stopping).
pub fn stop(state: &State) {
    let mut listeners = state
        .dns
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
    for (name, l) in listeners.drain() {
        if let Err(e) = maps.set_resolver(l.agent_id, ResolverPorts::default()) {
            tracing::warn!(agent = %name, error = %e, "could not stop steering the agent's DNS");
        }
    }
}

/// Binds the agent's sockets on 127.0.0.1 and ::1 (ephemeral ports) and
/// starts serving them. Without IPv6 on loopback the agent's IPv6 DNS is
/// not steered, so it is judged by its rules (denied, unless allowed).
fn listen(state: &Arc<State>, agent: &str, agent_id: u32) -> Result<Listeners> {
    let mut ports = ResolverPorts::default();
    let mut tasks = Vec::new();
    let v4: IpAddr = [127, 0, 0, 1].into();
    let v6: IpAddr = std::net::Ipv6Addr::LOCALHOST.into();
    for ip in [v4, v6] {
        let udp = std::net::UdpSocket::bind((ip, 0));
        let tcp = std::net::TcpListener::bind((ip, 0));
        let (udp, tcp) = match (udp, tcp) {
            (Ok(u), Ok(t)) => (u, t),
            (Err(e), _) | (_, Err(e)) if ip.is_ipv6() => {
                tracing::warn!(agent, error = %e, "no resolver on ::1: the agent's IPv6 DNS is not steered (denied unless its rules allow it)");
                continue;
            }
            (Err(e), _) | (_, Err(e)) => {
                return Err(e).ctx(|| format!("binding agent {agent}'s resolver on {ip}"));
            }
        };
        let udp_port = udp.local_addr().ctx(|| "resolver address".into())?.port();
        let tcp_port = tcp.local_addr().ctx(|| "resolver address".into())?.port();
        udp.set_nonblocking(true).ctx(|| "resolver socket".into())?;
        tcp.set_nonblocking(true).ctx(|| "resolver socket".into())?;
        let udp = UdpSocket::from_std(udp).ctx(|| "resolver socket".into())?;
        let tcp = tokio::net::TcpListener::from_std(tcp).ctx(|| "resolver socket".into())?;
        if ip.is_ipv4() {
            (ports.udp4, ports.tcp4) = (udp_port, tcp_port);
        } else {
            (ports.udp6, ports.tcp6) = (udp_port, tcp_port);
        }
        tasks.push(tokio::spawn(serve_udp(
            Arc::new(udp),
            agent.to_owned(),
            state.clone(),
        )));
        tasks.push(tokio::spawn(serve_tcp(
            tcp,
            agent.to_owned(),
            state.clone(),
        )));
    }
    tracing::info!(agent, ?ports, "resolver listening for the agent's DNS");
    Ok(Listeners {
        agent_id,
        ports,
        tasks,
    })
}

async fn serve_udp(sock: Arc<UdpSocket>, agent: String, state: Arc<State>) {
    let limit = Arc::new(Semaphore::new(UDP_IN_FLIGHT));
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(agent = %agent, error = %e, "resolver receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            state.metrics.dns_query(&agent, "none", "dropped");
            continue;
        };
        let bytes = buf[..n].to_vec();
        let (sock, agent, state) = (sock.clone(), agent.clone(), state.clone());
        tokio::spawn(async move {
            if let Some(reply) = query::answer(&state, &agent, &bytes, Transport::Udp).await {
                let _ = sock.send_to(&reply, peer).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener, agent: String, state: Arc<State>) {
    let limit = Arc::new(Semaphore::new(TCP_CONNECTIONS));
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let (agent, state) = (agent.clone(), state.clone());
        tokio::spawn(async move {
            loop {
                let read = tokio::time::timeout(TCP_IDLE, exchange::read_framed(&mut conn)).await;
                let Ok(Ok(bytes)) = read else { break };
                let Some(reply) = query::answer(&state, &agent, &bytes, Transport::Tcp).await
                else {
                    break;
                };
                if exchange::write_framed(&mut conn, &reply).await.is_err() {
                    break;
                }
            }
            drop(permit);
        });
    }
}

/// Sweeps expired learned addresses until the daemon stops, and saves the
/// names behind the rest when they changed (a daemon killed outright loses
/// at most one period's worth: those agents re-resolve after its restart).
pub async fn sweep(state: Arc<State>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        let state = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _saving = state.dns.saving.lock().unwrap_or_else(|p| p.into_inner());
            let changed = {
                let mut learned = state.dns.learned();
                let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
                learned.sweep(&mut maps);
                learned.changed()
            };
            if let Some(saved) = changed
                && !write_saved(&state, &saved)
            {
                state.dns.learned().mark_unsaved();
            }
        })
        .await;
    }
}

/// Saves the names behind every learned address (the daemon is stopping).
pub fn save(state: &State) {
    let _saving = state.dns.saving.lock().unwrap_or_else(|p| p.into_inner());
    let saved = state.dns.learned().saved();
    write_saved(state, &saved);
}

fn write_saved(state: &State, saved: &saved::Saved) -> bool {
    match saved.save(&state.config().daemon.state_dir) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "saving learned names failed; after a restart agents re-resolve");
            false
        }
    }
}
