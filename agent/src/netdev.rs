//! Network devices of the agent's network namespace: names, indexes and IPv4 addresses, read with
//! libc (netlink under the hood), so the answer is the current namespace's even when /sys belongs
//! to another one (`nsenter --net`).
use std::{collections::BTreeMap, ffi::CStr, net::Ipv4Addr};

/// Every interface: name → ifindex.
pub fn interfaces() -> std::io::Result<BTreeMap<String, u32>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut out = BTreeMap::new();
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.insert(name, (*p).if_index);
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// IPv4 addresses by interface name, in the kernel's order.
pub fn ipv4_addrs() -> std::io::Result<BTreeMap<String, Vec<Ipv4Addr>>> {
    let mut out: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    // SAFETY: getifaddrs fills a linked list we only read and then free with freeifaddrs.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut p = head;
        while !p.is_null() {
            let ifa = &*p;
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let name = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
                out.entry(name).or_default().push(addr);
            }
            p = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// The IPv4 addresses of `devices`, in device order (NodePort frontends; the first one is the
/// source-NAT address).
pub fn node_addrs(devices: &[String]) -> std::io::Result<Vec<Ipv4Addr>> {
    let all = ipv4_addrs()?;
    Ok(devices.iter().flat_map(|d| all.get(d).cloned().unwrap_or_default()).collect())
}

/// Shell-style match with `*` (any run) and `?` (one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether `name` matches any of `globs`.
pub fn matches_any(globs: &[String], name: &str) -> bool {
    globs.iter().any(|g| glob_match(g, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, n, want) in [
            ("vp*", "vp0", true),
            ("vp*", "vp", true),
            ("vp*", "eth0", false),
            ("veth*", "vp1", false),
            ("lxc?", "lxc1", true),
            ("lxc?", "lxc12", false),
            ("*pod*", "mypod7", true),
            ("eth0", "eth0", true),
            ("eth0", "eth01", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ] {
            assert_eq!(glob_match(p, n), want, "{p} {n}");
        }
        assert!(matches_any(&["x*".into(), "vp*".into()], "vp3"));
    }

    #[test]
    fn loopback_is_listed_with_its_address() {
        let ifs = interfaces().unwrap();
        assert!(ifs.contains_key("lo"), "{ifs:?}");
        let addrs = ipv4_addrs().unwrap();
        // lo may be down in a bare namespace, but if it has an address it is 127.0.0.1.
        if let Some(a) = addrs.get("lo") {
            assert!(a.contains(&Ipv4Addr::LOCALHOST), "{a:?}");
        }
        assert!(node_addrs(&["no-such-dev".into()]).unwrap().is_empty());
    }
}
