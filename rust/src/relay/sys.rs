//! The few system calls std does not offer: epoll readiness and batched datagram I/O
//! (recvmmsg/sendmmsg with scatter-gather, so headers are prepended without copying payloads,
//! and UDP GSO for runs of equal-sized datagrams to one address).
//!
//! Linux only; every unsafe block is a plain libc call on buffers this module owns and sizes.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

/// An epoll instance; each registered socket carries a `u64` token.
pub struct Poller {
    epoll: OwnedFd,
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a fresh fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a valid descriptor returned above and owned by nobody else.
        Ok(Poller {
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watch `fd` for readability (level-triggered).
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: event is a valid epoll_event for the duration of the call.
        let r =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stop watching `fd` (before it is closed, so no stale event names a reused number).
    pub fn remove(&self, fd: RawFd) {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in add; errors (fd not registered) are irrelevant here.
        unsafe {
            libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut event);
        }
    }

    /// Wait up to `timeout_ms` for readiness; fills `tokens` (cleared first).
    pub fn wait(
        &self,
        events: &mut Vec<libc::epoll_event>,
        tokens: &mut Vec<u64>,
        timeout_ms: i32,
    ) {
        tokens.clear();
        let capacity = events.capacity().max(1);
        events.clear();
        // SAFETY: the kernel writes at most `capacity` events into the vector's spare capacity;
        // set_len covers exactly the count it reports.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                capacity as i32,
                timeout_ms,
            )
        };
        if n > 0 {
            // SAFETY: see above; n <= capacity.
            unsafe { events.set_len(n as usize) };
            tokens.extend(events.iter().map(|e| e.u64));
        }
    }
}

fn to_sockaddr(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(out as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let sin6 = unsafe { &mut *(out as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Receive buffers for up to `capacity` datagrams of up to `slot` bytes each; [`RecvBatch::get`]
/// reads the datagrams of the last [`RecvBatch::recv`].
pub struct RecvBatch {
    slot: usize,
    buffers: Vec<u8>,
    lengths: Vec<usize>,
    sources: Vec<Option<SocketAddr>>,
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
}

impl RecvBatch {
    pub fn new(capacity: usize, slot: usize) -> Self {
        RecvBatch {
            slot,
            buffers: vec![0; capacity * slot],
            lengths: vec![0; capacity],
            sources: vec![None; capacity],
            // SAFETY: all-zero is a valid value of these plain C structs.
            headers: (0..capacity).map(|_| unsafe { zeroed() }).collect(),
            iovecs: (0..capacity)
                .map(|_| libc::iovec {
                    iov_base: ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: as above.
            names: (0..capacity).map(|_| unsafe { zeroed() }).collect(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.lengths.len()
    }

    /// The `i`th datagram and its source (None: a truncated datagram or an unknown family).
    #[inline]
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let start = i * self.slot;
        (
            &self.buffers[start..start + self.lengths[i]],
            self.sources[i],
        )
    }

    /// Receive what is waiting on `socket` (non-blocking), up to the capacity.
    pub fn recv(&mut self, socket: &UdpSocket) -> usize {
        let capacity = self.capacity();
        for i in 0..capacity {
            self.iovecs[i] = libc::iovec {
                iov_base: self.buffers[i * self.slot..].as_mut_ptr().cast(),
                iov_len: self.slot,
            };
            let header = &mut self.headers[i].msg_hdr;
            header.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            header.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_iov = &mut self.iovecs[i];
            header.msg_iovlen = 1;
            header.msg_control = ptr::null_mut();
            header.msg_controllen = 0;
            header.msg_flags = 0;
        }
        let n = loop {
            // SAFETY: every header points at buffers owned by self that outlive the call, with
            // lengths matching their allocations.
            let n = unsafe {
                libc::recvmmsg(
                    socket.as_raw_fd(),
                    self.headers.as_mut_ptr(),
                    capacity as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break n;
        };
        if n <= 0 {
            return 0;
        }
        let n = n as usize;
        for i in 0..n {
            let header = &self.headers[i];
            let truncated = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.lengths[i] = (header.msg_len as usize).min(self.slot);
            self.sources[i] = if truncated {
                None
            } else {
                from_sockaddr(&self.names[i])
            };
        }
        n
    }
}

/// One datagram to send: `head ‖ body ‖ pad zero bytes` to `to`.
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    pub head: &'a [u8],
    pub body: &'a [u8],
    pub pad: usize,
    pub to: SocketAddr,
}

impl Outgoing<'_> {
    /// The datagram's size on the wire.
    #[inline]
    pub fn wire_len(&self) -> usize {
        self.head.len() + self.body.len() + self.pad.min(3)
    }
}

static ZEROS: [u8; 4] = [0; 4];

/// The most datagrams one GSO send carries (the kernel's `UDP_MAX_SEGMENTS` is at least 64).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Datagrams larger than this are never sent with GSO: a segment must fit the path MTU
/// (1500-byte Ethernet less IPv6 and UDP headers), or the kernel refuses the whole send.
pub const GSO_MAX_SEGMENT: usize = 1452;
/// The most payload bytes in one GSO send (one UDP datagram's worth, with room for headers).
const GSO_MAX_BYTES: usize = 65_000;
const IOV_PER_DATAGRAM: usize = 3;

/// One sendmmsg message: `count` datagrams from `first`, sent as one GSO buffer when more
/// than one.
#[derive(Clone, Copy)]
struct Group {
    first: usize,
    count: usize,
}

/// Scratch space for [`SendBatch::send`].
pub struct SendBatch {
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    /// One `UDP_SEGMENT` control message per header (u64s: cmsghdr alignment).
    controls: Vec<[u64; 4]>,
    groups: Vec<Group>,
    retry: Vec<Group>,
    /// Cleared for good the first time the kernel says it cannot do UDP GSO.
    gso: bool,
    /// Largest datagram sent with GSO: lowered below a size the kernel refused (EINVAL: the
    /// segment does not fit a route's MTU, e.g. a tunnel's), so it is not tried again.
    gso_max_segment: usize,
}

impl SendBatch {
    pub fn new(capacity: usize) -> Self {
        let empty = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        SendBatch {
            headers: (0..capacity).map(|_| unsafe { zeroed() }).collect(),
            iovecs: vec![empty; capacity * IOV_PER_DATAGRAM],
            names: (0..capacity).map(|_| unsafe { zeroed() }).collect(),
            controls: vec![[0; 4]; capacity],
            groups: Vec::with_capacity(capacity),
            retry: Vec::new(),
            gso: true,
            gso_max_segment: GSO_MAX_SEGMENT,
        }
    }

    /// Whether GSO is still in use (the kernel has not refused it).
    #[cfg(test)]
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Turn GSO off (an operator's choice, or a comparison).
    pub fn disable_gso(&mut self) {
        self.gso = false;
    }

    /// How many datagrams from `first` go out as one GSO buffer: consecutive ones to the same
    /// address, all of the first one's size but the last (which may be shorter): the kernel
    /// cuts the buffer into `size`-byte datagrams. Order is kept, so each flow's too.
    fn group_len(&self, messages: &[Outgoing<'_>], first: usize, room: usize) -> usize {
        let size = messages[first].wire_len();
        if !self.gso || size == 0 || size > self.gso_max_segment {
            return 1;
        }
        let limit = room.min(GSO_MAX_SEGMENTS).min(GSO_MAX_BYTES / size);
        let to = messages[first].to;
        let mut count = 1;
        while count < limit {
            let Some(next) = messages.get(first + count) else {
                break;
            };
            if next.to != to || next.wire_len() > size || next.wire_len() == 0 {
                break;
            }
            count += 1;
            if next.wire_len() < size {
                break;
            }
        }
        count
    }

    /// Send `messages` from `fd` with as few system calls as it takes: one sendmmsg per
    /// `capacity` messages, runs to one address as one GSO buffer each. Calls `failed(i)` for
    /// each datagram the kernel refused (full buffer, unreachable …); never blocks.
    pub fn send(&mut self, fd: RawFd, messages: &[Outgoing<'_>], mut failed: impl FnMut(usize)) {
        let capacity = self.headers.len();
        let mut next = 0;
        while next < messages.len() {
            // Fill up to `capacity` headers (and datagrams: the iovecs are sized for them).
            self.groups.clear();
            let mut datagrams = 0;
            while next < messages.len() && self.groups.len() < capacity && datagrams < capacity {
                let count = self.group_len(messages, next, capacity - datagrams);
                self.groups.push(Group { first: next, count });
                next += count;
                datagrams += count;
            }
            let mut iov_at = 0;
            for (i, group) in self.groups.iter().enumerate() {
                let first = &messages[group.first];
                let namelen = to_sockaddr(first.to, &mut self.names[i]);
                let iov_start = iov_at;
                for m in &messages[group.first..group.first + group.count] {
                    for (base, len) in [
                        (m.head.as_ptr(), m.head.len()),
                        (m.body.as_ptr(), m.body.len()),
                        (ZEROS.as_ptr(), m.pad.min(3)),
                    ] {
                        if len > 0 {
                            self.iovecs[iov_at] = libc::iovec {
                                iov_base: base as *mut libc::c_void,
                                iov_len: len,
                            };
                            iov_at += 1;
                        }
                    }
                }
                let header = &mut self.headers[i].msg_hdr;
                header.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                header.msg_namelen = namelen;
                header.msg_iov = self.iovecs[iov_start..].as_mut_ptr();
                header.msg_iovlen = iov_at - iov_start;
                header.msg_flags = 0;
                if group.count > 1 {
                    let control = &mut self.controls[i];
                    let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
                    header.msg_control = control.as_mut_ptr().cast();
                    header.msg_controllen = space;
                    unsafe {
                        let cmsg = libc::CMSG_FIRSTHDR(header);
                        (*cmsg).cmsg_level = libc::SOL_UDP;
                        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                        let size = first.wire_len() as u16;
                        ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size);
                    }
                } else {
                    header.msg_control = ptr::null_mut();
                    header.msg_controllen = 0;
                }
            }
            let total = self.groups.len();
            let mut sent = 0;
            while sent < total {
                let n = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.headers[sent..].as_mut_ptr(),
                        (total - sent) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if n >= 0 {
                    sent += n as usize;
                    continue;
                }
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                let group = self.groups[sent];
                let refused_gso = matches!(
                    error.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
                );
                if group.count > 1 && refused_gso {
                    // No GSO here (EIO, EOPNOTSUPP: the device or kernel cannot; EINVAL: this
                    // buffer): send that run one by one after this batch.
                    if error.raw_os_error() == Some(libc::EINVAL) {
                        let size = messages[group.first].wire_len();
                        self.gso_max_segment = self.gso_max_segment.min(size - 1);
                    } else {
                        self.gso = false;
                    }
                    self.retry.push(group);
                } else {
                    for k in 0..group.count {
                        failed(group.first + k);
                    }
                }
                sent += 1;
            }
            while let Some(group) = self.retry.pop() {
                let run = &messages[group.first..group.first + group.count];
                for (k, m) in run.iter().enumerate() {
                    if !send_one(fd, m) {
                        failed(group.first + k);
                    }
                }
            }
        }
    }
}

/// One datagram with sendmsg; false if the kernel refused it.
fn send_one(fd: RawFd, m: &Outgoing<'_>) -> bool {
    let mut name: libc::sockaddr_storage = unsafe { zeroed() };
    let namelen = to_sockaddr(m.to, &mut name);
    let mut iov = [
        libc::iovec {
            iov_base: m.head.as_ptr() as *mut libc::c_void,
            iov_len: m.head.len(),
        },
        libc::iovec {
            iov_base: m.body.as_ptr() as *mut libc::c_void,
            iov_len: m.body.len(),
        },
        libc::iovec {
            iov_base: ZEROS.as_ptr() as *mut libc::c_void,
            iov_len: m.pad.min(3),
        },
    ];
    let mut header: libc::msghdr = unsafe { zeroed() };
    header.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    header.msg_namelen = namelen;
    header.msg_iov = iov.as_mut_ptr();
    header.msg_iovlen = iov.len();
    loop {
        let n = unsafe { libc::sendmsg(fd, &header, libc::MSG_DONTWAIT) };
        if n >= 0 {
            return true;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Best-effort socket buffer sizes (the kernel caps them at net.core.[rw]mem_max).
pub fn set_buffer_sizes(socket: &UdpSocket, bytes: usize) {
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_over_loopback() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let bodies: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; i as usize]).collect();
        let messages: Vec<Outgoing<'_>> = bodies
            .iter()
            .map(|body| Outgoing {
                head: b"hd",
                body,
                pad: body.len() % 3,
                to,
            })
            .collect();
        let mut send = SendBatch::new(16);
        let mut failures = 0;
        send.send(a.as_raw_fd(), &messages, |_| failures += 1);
        assert_eq!(failures, 0);
        let mut recv = RecvBatch::new(8, 2048);
        let mut got = Vec::new();
        b.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        while got.len() < bodies.len() {
            let mut probe = [0u8; 1];
            // Block until something is there, without consuming it.
            b.peek_from(&mut probe).unwrap();
            let n = recv.recv(&b);
            for i in 0..n {
                let (data, from) = recv.get(i);
                assert_eq!(from, Some(a.local_addr().unwrap()));
                got.push(data.to_vec());
            }
        }
        for (i, data) in got.iter().enumerate() {
            let body = &bodies[i];
            let mut expected = b"hd".to_vec();
            expected.extend_from_slice(body);
            expected.resize(expected.len() + body.len() % 3, 0);
            assert_eq!(data, &expected);
        }
        // Nothing left: a non-blocking receive returns 0.
        assert_eq!(recv.recv(&b), 0);
        // An IPv6 destination on an IPv4 socket fails and is reported, not fatal.
        let v6 = Outgoing {
            head: b"",
            body: b"x",
            pad: 0,
            to: "[::1]:9".parse().unwrap(),
        };
        let mut failed = Vec::new();
        send.send(a.as_raw_fd(), &[v6], |i| failed.push(i));
        assert_eq!(failed, vec![0]);
    }

    /// Everything `b` receives until `count` datagrams arrived, with their sources.
    fn receive_all(b: &UdpSocket, count: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut recv = RecvBatch::new(64, 2048);
        let mut got = Vec::new();
        b.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        while got.len() < count {
            let mut probe = [0u8; 1];
            b.peek_from(&mut probe).unwrap();
            let n = recv.recv(b);
            for i in 0..n {
                let (data, from) = recv.get(i);
                got.push((data.to_vec(), from.unwrap()));
            }
        }
        assert_eq!(recv.recv(b), 0, "more datagrams than sent");
        got
    }

    #[test]
    fn gso_runs_arrive_as_the_datagrams_they_were() {
        // Runs to one address (equal sizes, the last shorter, some longer than GSO takes)
        // interleaved with another address: every datagram arrives whole and in order, with
        // GSO and without.
        for gso in [true, false] {
            let a = UdpSocket::bind("127.0.0.1:0").unwrap();
            let (b, c) = (
                UdpSocket::bind("127.0.0.1:0").unwrap(),
                UdpSocket::bind("127.0.0.1:0").unwrap(),
            );
            let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
            let mut plan: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
            for i in 0..150u32 {
                plan.push((vec![i as u8; 170], to_b));
            }
            plan.push((vec![1; 60], to_b));
            plan.push((vec![2; 60], to_c));
            for i in 0..5u8 {
                plan.push((vec![i; 1200], to_c));
                plan.push((vec![i; 1200], to_c));
                plan.push((vec![i; 1500], to_c)); // over GSO_MAX_SEGMENT: alone
            }
            let messages: Vec<Outgoing<'_>> = plan
                .iter()
                .map(|(body, to)| Outgoing {
                    head: &body[..4],
                    body: &body[4..body.len() - 1],
                    pad: 1,
                    to: *to,
                })
                .collect();
            let mut send = SendBatch::new(64);
            if !gso {
                send.disable_gso();
            }
            let mut failures = 0;
            send.send(a.as_raw_fd(), &messages, |_| failures += 1);
            assert_eq!(failures, 0);
            assert_eq!(send.gso(), gso, "the kernel refused UDP GSO");
            let expected = |to: SocketAddr| -> Vec<Vec<u8>> {
                plan.iter()
                    .filter(|(_, t)| *t == to)
                    .map(|(body, _)| {
                        let mut d = body[..body.len() - 1].to_vec();
                        d.push(0);
                        d
                    })
                    .collect()
            };
            for (socket, to) in [(&b, to_b), (&c, to_c)] {
                let want = expected(to);
                let got = receive_all(socket, want.len());
                assert!(got.iter().all(|(_, from)| *from == a.local_addr().unwrap()));
                let got: Vec<Vec<u8>> = got.into_iter().map(|(d, _)| d).collect();
                assert_eq!(got, want, "gso {gso}");
            }
        }
    }

    #[test]
    fn gso_runs_respect_the_kernels_limits() {
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:10".parse().unwrap();
        let body = vec![0u8; 2000];
        let make = |sizes: &[(usize, SocketAddr)]| -> Vec<Outgoing<'_>> {
            sizes
                .iter()
                .map(|&(n, to)| Outgoing {
                    head: &[],
                    body: &body[..n],
                    pad: 0,
                    to,
                })
                .collect()
        };
        let mut batch = SendBatch::new(128);
        let runs = |batch: &SendBatch, m: &[Outgoing<'_>]| -> Vec<usize> {
            let mut out = Vec::new();
            let mut at = 0;
            while at < m.len() {
                let n = batch.group_len(m, at, 128);
                out.push(n);
                at += n;
            }
            out
        };
        // At most 64 datagrams, and at most 65,000 bytes, in one buffer.
        assert_eq!(runs(&batch, &make(&[(100, to); 100])), vec![64, 36]);
        assert_eq!(runs(&batch, &make(&[(1452, to); 100])), vec![44, 44, 12]);
        // A shorter one ends a run, a longer one or another address starts a new one; empty
        // and oversized datagrams go alone.
        let m = make(&[
            (500, to),
            (500, to),
            (499, to),
            (500, to),
            (600, to),
            (600, other),
        ]);
        assert_eq!(runs(&batch, &m), vec![3, 1, 1, 1]);
        let m = make(&[(0, to), (0, to), (1453, to), (1453, to)]);
        assert_eq!(runs(&batch, &m), vec![1, 1, 1, 1]);
        // After an EINVAL at some size, that size and larger go alone.
        batch.gso_max_segment = 599;
        assert_eq!(runs(&batch, &make(&[(600, to); 3])), vec![1, 1, 1]);
        assert_eq!(runs(&batch, &make(&[(599, to); 3])), vec![3]);
        batch.disable_gso();
        assert_eq!(runs(&batch, &make(&[(100, to); 3])), vec![1, 1, 1]);
    }

    #[test]
    fn poller_reports_tokens() {
        let poller = Poller::new().unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        poller.add(a.as_raw_fd(), 42).unwrap();
        let mut events = Vec::with_capacity(8);
        let mut tokens = Vec::new();
        poller.wait(&mut events, &mut tokens, 0);
        assert!(tokens.is_empty());
        a.send_to(b"x", a.local_addr().unwrap()).unwrap();
        poller.wait(&mut events, &mut tokens, 1000);
        assert_eq!(tokens, vec![42]);
        poller.remove(a.as_raw_fd());
        poller.wait(&mut events, &mut tokens, 0);
        assert!(tokens.is_empty());
    }
}
