//! Loading agentd's eBPF object and attaching its programs to agent cgroups
//! through pinned links, so enforcement outlives the daemon and a restarted
//! daemon re-adopts what is attached instead of attaching twice.
use std::{
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use agentd_ebpf::{
    AgentCounters, AgentEntry, LearnedKey, LearnedValue, PortBlock, PortBlockKey, ResolverPorts,
    Rule4Key, Rule6Key, RuleValue, SteeredDst, map_names,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapInfo, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        links::{FdLink, LinkError, PinnedLink},
    },
};

use crate::{
    bpffs,
    error::{Error, IoContext as _, Result},
};

/// The object built from `agentd-ebpf` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentd-ebpf"));

/// One hook: program name in the object and the kernel attach type it uses
/// (`enum bpf_attach_type` in the UAPI), for querying what is attached.
#[derive(Debug, Clone, Copy)]
pub struct Hook {
    pub program: &'static str,
    pub attach_type: u32,
    /// The program reads its agent from the identity map (cgroup local
    /// storage), which must be written for this attach type.
    pub identity: bool,
}

/// Every hook agentd attaches to each agent cgroup.
pub const HOOKS: [Hook; 11] = [
    Hook {
        program: "agentd_connect4",
        attach_type: 10, // BPF_CGROUP_INET4_CONNECT
        identity: true,
    },
    Hook {
        program: "agentd_connect6",
        attach_type: 11, // BPF_CGROUP_INET6_CONNECT
        identity: true,
    },
    Hook {
        program: "agentd_sendmsg4",
        attach_type: 14, // BPF_CGROUP_UDP4_SENDMSG
        identity: true,
    },
    Hook {
        program: "agentd_sendmsg6",
        attach_type: 15, // BPF_CGROUP_UDP6_SENDMSG
        identity: true,
    },
    Hook {
        program: "agentd_sock_create",
        attach_type: 2, // BPF_CGROUP_INET_SOCK_CREATE
        identity: true,
    },
    Hook {
        program: "agentd_ingress",
        attach_type: 0, // BPF_CGROUP_INET_INGRESS
        identity: true,
    },
    Hook {
        program: "agentd_egress",
        attach_type: 1, // BPF_CGROUP_INET_EGRESS
        identity: true,
    },
    // DNS steering's second half: show replies and peers as the server the
    // agent asked. These go by socket cookie, not by agent.
    Hook {
        program: "agentd_recvmsg4",
        attach_type: 19, // BPF_CGROUP_UDP4_RECVMSG
        identity: false,
    },
    Hook {
        program: "agentd_recvmsg6",
        attach_type: 20, // BPF_CGROUP_UDP6_RECVMSG
        identity: false,
    },
    Hook {
        program: "agentd_getpeername4",
        attach_type: 29, // BPF_CGROUP_INET4_GETPEERNAME
        identity: false,
    },
    Hook {
        program: "agentd_getpeername6",
        attach_type: 30, // BPF_CGROUP_INET6_GETPEERNAME
        identity: false,
    },
];

/// Expected (key size, value size) of each pinned map.
fn expected_layouts() -> [(&'static str, usize, usize); 10] {
    use std::mem::size_of;
    [
        (map_names::AGENTS, size_of::<u64>(), size_of::<AgentEntry>()),
        (
            map_names::RULES_V4,
            size_of::<Key<Rule4Key>>(),
            size_of::<RuleValue>(),
        ),
        (
            map_names::RULES_V6,
            size_of::<Key<Rule6Key>>(),
            size_of::<RuleValue>(),
        ),
        (
            map_names::PORTS,
            size_of::<PortBlockKey>(),
            size_of::<PortBlock>(),
        ),
        (
            map_names::COUNTERS,
            size_of::<u32>(),
            size_of::<AgentCounters>(),
        ),
        (map_names::EVENTS, 0, 0),
        // struct bpf_cgroup_storage_key { u64 cgroup_inode_id; u32 attach_type; } -> 16
        (map_names::IDENTITY, 16, size_of::<u64>()),
        (
            map_names::LEARNED,
            size_of::<LearnedKey>(),
            size_of::<LearnedValue>(),
        ),
        (
            map_names::RESOLVERS,
            size_of::<u32>(),
            size_of::<ResolverPorts>(),
        ),
        (
            map_names::STEERED,
            size_of::<u64>(),
            size_of::<SteeredDst>(),
        ),
    ]
}

/// Refuses pinned maps whose layout differs from this build's: reusing them
/// would misread the policy.
fn check_pinned_layouts(maps_dir: &Path) -> Result<()> {
    for (name, key, value) in expected_layouts() {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| Error::Map {
            map: name.into(),
            source,
        })?;
        if info.key_size() as usize != key || info.value_size() as usize != value {
            return Err(Error::IncompatiblePins {
                map: name.into(),
                dir: maps_dir.to_owned(),
                found_key: info.key_size(),
                found_value: info.value_size(),
                want_key: key as u32,
                want_value: value as u32,
            });
        }
    }
    Ok(())
}

/// Loads the object, reusing maps already pinned under `bpffs_dir` (the
/// state a previous daemon left enforcing), and loads every program.
pub fn load(bpffs_dir: &Path) -> Result<Ebpf> {
    let maps_dir = bpffs::maps_dir(bpffs_dir);
    check_pinned_layouts(&maps_dir)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&maps_dir)
        .load(OBJECT)?;
    for hook in HOOKS {
        let program = ebpf.program_mut(hook.program).ok_or_else(|| {
            Error::Refused(format!("program {} missing from object", hook.program))
        })?;
        let result = match program {
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            aya::programs::Program::CgroupSock(p) => p.load(),
            aya::programs::Program::CgroupSkb(p) => p.load(),
            _ => {
                return Err(Error::Refused(format!(
                    "program {} has an unexpected type",
                    hook.program
                )));
            }
        };
        result.map_err(|source| Error::Program {
            program: hook.program.into(),
            source,
        })?;
    }
    Ok(ebpf)
}

/// How an agent's hooks came to be in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// Attached now by this daemon.
    Attached,
    /// Found attached through a pinned link left by an earlier daemon.
    Adopted,
}

/// Attaches every hook to `cgroup_dir`, or re-adopts the pinned link when it
/// is still attached there, so a restart never attaches twice and never
/// leaves a window without enforcement.
pub fn attach_or_adopt(
    ebpf: &mut Ebpf,
    bpffs_dir: &Path,
    agent: &str,
    cgroup_dir: &Path,
) -> Result<Vec<(Hook, Attachment)>> {
    let links_dir = bpffs::agent_links_dir(bpffs_dir, agent);
    fs::create_dir_all(&links_dir).ctx(|| format!("creating {}", links_dir.display()))?;
    let cgroup = fs::File::open(cgroup_dir).ctx(|| format!("opening {}", cgroup_dir.display()))?;
    let mut out = Vec::with_capacity(HOOKS.len());
    for hook in HOOKS {
        let pin = links_dir.join(hook.program);
        if pin.exists() {
            match pinned_program_id(&pin) {
                Ok(prog_id) if attached_programs(&cgroup, hook.attach_type)?.contains(&prog_id) => {
                    out.push((hook, Attachment::Adopted));
                    continue;
                }
                // A pin that no longer points at this cgroup (the cgroup was
                // recreated): drop it and attach afresh below.
                _ => {
                    fs::remove_file(&pin).ctx(|| format!("removing stale pin {}", pin.display()))?
                }
            }
        }
        attach_one(ebpf, hook, &cgroup, &pin)?;
        out.push((hook, Attachment::Attached));
    }
    Ok(out)
}

fn attach_one(ebpf: &mut Ebpf, hook: Hook, cgroup: &fs::File, pin: &Path) -> Result<()> {
    let program = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| Error::Refused(format!("program {} missing", hook.program)))?;
    let perr = |source| Error::Program {
        program: hook.program.into(),
        source,
    };
    // Through a BPF link (kernel >= 5.7) the attachment is always "multi":
    // other tools' programs on the same cgroup keep working and every program
    // must allow a call for it to pass. The kernel rejects explicit flags on
    // link_create, hence `Single` (no flags).
    let fd_link = match program {
        aya::programs::Program::CgroupSockAddr(p) => {
            let p: &mut CgroupSockAddr = p;
            let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(perr)?;
            into_fd_link(p.take_link(id).map_err(perr)?, pin)?
        }
        aya::programs::Program::CgroupSock(p) => {
            let p: &mut CgroupSock = p;
            let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(perr)?;
            into_fd_link(p.take_link(id).map_err(perr)?, pin)?
        }
        aya::programs::Program::CgroupSkb(p) => {
            let p: &mut CgroupSkb = p;
            let direction = if hook.attach_type == 0 {
                CgroupSkbAttachType::Ingress
            } else {
                CgroupSkbAttachType::Egress
            };
            let id = p
                .attach(cgroup, direction, CgroupAttachMode::Single)
                .map_err(perr)?;
            into_fd_link(p.take_link(id).map_err(perr)?, pin)?
        }
        _ => {
            return Err(Error::Refused(format!(
                "{} has an unexpected type",
                hook.program
            )));
        }
    };
    fd_link.pin(pin).map_err(|e| Error::Pin {
        path: pin.to_owned(),
        message: e.to_string(),
    })?;
    Ok(())
}

/// The link as a plain fd link, so it can be pinned.
fn into_fd_link<L>(link: L, pin: &Path) -> Result<FdLink>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    FdLink::try_from(link).map_err(|e| Error::Pin {
        path: pin.to_owned(),
        message: e.to_string(),
    })
}

fn pinned_program_id(pin: &Path) -> Result<u32> {
    let link = PinnedLink::from_pin(pin).map_err(|e| Error::Pin {
        path: pin.to_owned(),
        message: e.to_string(),
    })?;
    let link: FdLink = link.into();
    let info = link.info().map_err(|e| Error::Pin {
        path: pin.to_owned(),
        message: e.to_string(),
    })?;
    Ok(info.program_id())
}

/// Ids of the programs attached directly to a cgroup for one attach type,
/// asked of the kernel (BPF_PROG_QUERY) rather than remembered.
pub fn attached_programs(cgroup: &fs::File, attach_type: u32) -> Result<Vec<u32>> {
    // The leading part of `union bpf_attr` used by BPF_PROG_QUERY.
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: attr is a valid, fully initialised prefix of bpf_attr and
    // prog_ids points at a buffer of prog_cnt u32s that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .ctx(|| "BPF_PROG_QUERY on agent cgroup".into());
    }
    let n = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids[..n].to_vec())
}

/// Whether the kernel has every hook attached to `cgroup_dir` through the
/// agent's pinned links: each pin's program must be in the cgroup's
/// attached list (BPF_PROG_QUERY). A missing pin, a detached link or a
/// recreated cgroup all answer false.
pub fn hooks_attached(bpffs_dir: &Path, agent: &str, cgroup_dir: &Path) -> bool {
    let links_dir = bpffs::agent_links_dir(bpffs_dir, agent);
    let Ok(cgroup) = fs::File::open(cgroup_dir) else {
        return false;
    };
    HOOKS.iter().all(|hook| {
        pinned_program_id(&links_dir.join(hook.program)).is_ok_and(|id| {
            attached_programs(&cgroup, hook.attach_type).is_ok_and(|ids| ids.contains(&id))
        })
    })
}

/// Removes an agent's pinned links; with no daemon holding them this detaches
/// the programs from its cgroup.
pub fn remove_links(bpffs_dir: &Path, agent: &str) -> Result<PathBuf> {
    let dir = bpffs::agent_links_dir(bpffs_dir, agent);
    if dir.exists() {
        fs::remove_dir_all(&dir).ctx(|| format!("removing {}", dir.display()))?;
    }
    Ok(dir)
}
