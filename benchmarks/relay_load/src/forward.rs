//! The ceiling: a bare UDP forwarder that does what a relay must do per datagram and nothing
//! else — receive ChannelData in batches, strip the 4-byte header, send the payload to the peer
//! its channel names; peers' datagrams go back to the channel's last client with the header
//! prepended. No authentication, permissions, expiry, quotas or counters; one thread, one
//! client-facing socket, one peer-facing socket.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::mmsg::{self, Outgoing, RecvBatch, SendBatch};

const BATCH: usize = 64;
/// Batches taken from one ready socket before looking at the other.
const ROUNDS: usize = 4;

struct Route {
    channel: u16,
    peer: (libc::sockaddr_storage, libc::socklen_t),
    peer_addr: SocketAddr,
    client: Option<(libc::sockaddr_storage, libc::socklen_t)>,
}

pub fn run(client: &UdpSocket, routes: &[(u16, SocketAddr)], stop: &AtomicBool, deadline: Instant) {
    let out = UdpSocket::bind("127.0.0.1:0").expect("bind the peer-facing socket");
    for socket in [client, &out] {
        mmsg::set_buffers(socket.as_raw_fd(), 4 << 20);
    }
    let mut routes: Vec<Route> = routes
        .iter()
        .map(|&(channel, peer)| Route {
            channel,
            peer: mmsg::to_sockaddr(peer),
            peer_addr: peer,
            client: None,
        })
        .collect();
    let mut recv = RecvBatch::new(BATCH, 65_536);
    let mut send = SendBatch::new(BATCH);
    let mut polls = [
        libc::pollfd {
            fd: client.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: polls is a valid array of two pollfd for the duration of the call.
        if unsafe { libc::poll(polls.as_mut_ptr(), 2, 50) } <= 0 {
            continue;
        }
        if polls[0].revents != 0 {
            for _ in 0..ROUNDS {
                let n = recv.recv(client.as_raw_fd(), false);
                to_peers(&recv, n, &mut routes, &out, &mut send);
                if n < BATCH {
                    break;
                }
            }
        }
        if polls[1].revents != 0 {
            for _ in 0..ROUNDS {
                let n = recv.recv(out.as_raw_fd(), false);
                to_clients(&recv, n, &routes, client, &mut send);
                if n < BATCH {
                    break;
                }
            }
        }
    }
}

fn to_peers(
    recv: &RecvBatch,
    n: usize,
    routes: &mut [Route],
    out: &UdpSocket,
    send: &mut SendBatch,
) {
    let mut picked = Vec::with_capacity(n);
    for i in 0..n {
        let data = recv.data(i);
        if data.len() < 4 {
            continue;
        }
        let channel = u16::from_be_bytes([data[0], data[1]]);
        let len = u16::from_be_bytes([data[2], data[3]]) as usize;
        let Some(index) = routes.iter().position(|r| r.channel == channel) else {
            continue;
        };
        if len + 4 > data.len() {
            continue;
        }
        if routes[index].client.is_none() {
            // The return path: the first client seen on the channel.
            routes[index].client = recv.source(i).map(mmsg::to_sockaddr);
        }
        picked.push((i, index, len));
    }
    let outgoing: Vec<Outgoing<'_>> = picked
        .iter()
        .map(|&(i, index, len)| Outgoing {
            head: &[],
            body: &recv.data(i)[4..4 + len],
            to: &routes[index].peer,
        })
        .collect();
    send.send(out.as_raw_fd(), &outgoing);
}

fn to_clients(
    recv: &RecvBatch,
    n: usize,
    routes: &[Route],
    client: &UdpSocket,
    send: &mut SendBatch,
) {
    let mut heads = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    for i in 0..n {
        let Some(from) = recv.source(i) else { continue };
        let Some(route) = routes.iter().find(|r| r.peer_addr == from) else {
            continue;
        };
        let Some(to) = route.client.as_ref() else {
            continue;
        };
        let mut head = [0u8; 4];
        head[..2].copy_from_slice(&route.channel.to_be_bytes());
        head[2..].copy_from_slice(&(recv.data(i).len() as u16).to_be_bytes());
        heads.push(head);
        targets.push((i, to));
    }
    let outgoing: Vec<Outgoing<'_>> = targets
        .iter()
        .zip(&heads)
        .map(|(&(i, to), head)| Outgoing {
            head,
            body: recv.data(i),
            to,
        })
        .collect();
    send.send(client.as_raw_fd(), &outgoing);
}
