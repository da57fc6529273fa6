//! Batched datagram I/O: recvmmsg into fixed slots, sendmmsg with a header and a body per
//! datagram (scatter-gather, so headers are added or stripped without copying payloads).
//!
//! Every unsafe block is a plain libc call on buffers this module owns and sizes.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::ptr;

pub fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut out: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut out as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut out as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (out, len as libc::socklen_t)
}

pub fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
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
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                0,
                0,
            )))
        }
        _ => None,
    }
}

/// Receive buffers for up to `capacity` datagrams of up to `slot` bytes each.
pub struct RecvBatch {
    slot: usize,
    buffers: Vec<u8>,
    lengths: Vec<usize>,
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

    /// The `i`th datagram of the last [`RecvBatch::recv`].
    pub fn data(&self, i: usize) -> &[u8] {
        let start = i * self.slot;
        &self.buffers[start..start + self.lengths[i]]
    }

    /// The `i`th datagram's source.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        from_sockaddr(&self.names[i])
    }

    /// Receive up to the capacity. `wait`: block (up to the socket's SO_RCVTIMEO) for the first
    /// datagram, then take what is queued; otherwise never block. 0 when nothing came.
    pub fn recv(&mut self, fd: RawFd, wait: bool) -> usize {
        let capacity = self.lengths.len();
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
            header.msg_flags = 0;
        }
        let flags = if wait {
            libc::MSG_WAITFORONE
        } else {
            libc::MSG_DONTWAIT
        };
        loop {
            // SAFETY: every header points at buffers owned by self that outlive the call.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.headers.as_mut_ptr(),
                    capacity as libc::c_uint,
                    flags,
                    ptr::null_mut(),
                )
            };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return 0;
            }
            let n = n as usize;
            for i in 0..n {
                self.lengths[i] = (self.headers[i].msg_len as usize).min(self.slot);
            }
            return n;
        }
    }
}

/// One datagram to send: `head` then `body`, to `to`.
pub struct Outgoing<'a> {
    pub head: &'a [u8],
    pub body: &'a [u8],
    pub to: &'a (libc::sockaddr_storage, libc::socklen_t),
}

/// sendmmsg scratch space, reused between calls.
pub struct SendBatch {
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<[libc::iovec; 2]>,
}

impl SendBatch {
    pub fn new(capacity: usize) -> Self {
        SendBatch {
            // SAFETY: all-zero is a valid mmsghdr.
            headers: (0..capacity).map(|_| unsafe { zeroed() }).collect(),
            iovecs: (0..capacity)
                .map(|_| {
                    [libc::iovec {
                        iov_base: ptr::null_mut(),
                        iov_len: 0,
                    }; 2]
                })
                .collect(),
        }
    }

    /// Send every datagram in `out` (at most the capacity) from `fd`; returns how many the
    /// kernel took. A datagram it refuses is skipped.
    pub fn send(&mut self, fd: RawFd, out: &[Outgoing<'_>]) -> usize {
        let n = out.len().min(self.headers.len());
        for (i, o) in out[..n].iter().enumerate() {
            self.iovecs[i] = [
                libc::iovec {
                    iov_base: o.head.as_ptr() as *mut libc::c_void,
                    iov_len: o.head.len(),
                },
                libc::iovec {
                    iov_base: o.body.as_ptr() as *mut libc::c_void,
                    iov_len: o.body.len(),
                },
            ];
            let header = &mut self.headers[i].msg_hdr;
            header.msg_name = &o.to.0 as *const libc::sockaddr_storage as *mut libc::c_void;
            header.msg_namelen = o.to.1;
            header.msg_iov = self.iovecs[i].as_mut_ptr();
            header.msg_iovlen = 2;
        }
        let (mut done, mut refused) = (0, 0);
        while done < n {
            // SAFETY: headers[done..n] point at iovecs and addresses that outlive the call; the
            // kernel only reads the buffers.
            let sent = unsafe {
                libc::sendmmsg(
                    fd,
                    self.headers[done..].as_mut_ptr(),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if sent < 0 {
                if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    refused += 1;
                    done += 1; // the first datagram failed: skip it, try the rest
                }
                continue;
            }
            done += sent as usize;
        }
        n - refused
    }
}

/// Ask for big socket buffers (the kernel caps them at net.core.{r,w}mem_max).
pub fn set_buffers(fd: RawFd, bytes: usize) {
    let value = bytes as libc::c_int;
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: value is a c_int that outlives the call.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}
