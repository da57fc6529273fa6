//! End-to-end: real loopback UDP sockets, client ↔ data plane ↔ peer.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::{codec, sys};
use super::{Config, DataPlane, DropReason, GlobalStats, RelayError};

const WAIT: Duration = Duration::from_secs(5);

fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// A config whose own addresses are not guarded: as if the operator allow-listed loopback, so
/// peers may sit on the relay's IP.
fn open_config(listen: &str) -> Config {
    let mut config = Config::new(listen.parse().unwrap());
    config.own_ips = Some(Vec::new());
    config
}

fn plane() -> DataPlane {
    DataPlane::start(open_config("127.0.0.1:0")).unwrap()
}

fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 70_000];
    let (n, from) = s.recv_from(&mut buf).expect("a datagram in time");
    buf.truncate(n);
    (buf, from)
}

fn nothing_arrives(s: &UdpSocket) {
    s.set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let mut buf = [0u8; 2048];
    assert!(s.recv_from(&mut buf).is_err(), "a datagram arrived");
    s.set_read_timeout(Some(WAIT)).unwrap();
}

/// Wait until the counters satisfy `done` (the worker runs on its own thread).
fn wait_stats(plane: &DataPlane, done: impl Fn(&GlobalStats) -> bool) -> GlobalStats {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = plane.stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "counters never got there: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn dropped(stats: &GlobalStats, reason: DropReason) -> u64 {
    stats.traffic.dropped(reason)
}

#[test]
fn send_and_data_indications_and_channels_both_ways() {
    let plane = plane();
    let server = plane.local_addr();
    let (client, peer) = (socket(), socket());
    let (client_addr, peer_addr) = (client.local_addr().unwrap(), peer.local_addr().unwrap());
    let relayed = plane.allocate(client_addr, 0, false).unwrap();
    assert_eq!(relayed.ip(), server.ip());
    assert!(matches!(
        plane.allocate(client_addr, 0, false),
        Err(RelayError::Invalid(_))
    ));

    // Without a permission, a Send indication is dropped.
    let t = [1u8; 12];
    client
        .send_to(
            &codec::encode_send_indication(&t, peer_addr, b"early"),
            server,
        )
        .unwrap();
    wait_stats(&plane, |s| dropped(s, DropReason::NoPermission) == 1);

    plane
        .add_permission(client_addr, peer_addr.ip(), Duration::from_secs(60))
        .unwrap();
    client
        .send_to(
            &codec::encode_send_indication(&t, peer_addr, b"hello peer"),
            server,
        )
        .unwrap();
    assert_eq!(recv(&peer), (b"hello peer".to_vec(), relayed));

    // Peer → client without a channel: a Data indication.
    peer.send_to(b"hello client", relayed).unwrap();
    let (message, from) = recv(&client);
    assert_eq!(from, server);
    assert_eq!(
        codec::decode_data_indication(&message).unwrap(),
        (peer_addr, &b"hello client"[..])
    );

    // Bind a channel: ChannelData both ways, padded or not.
    plane
        .bind_channel(client_addr, 0x4001, peer_addr, Duration::from_secs(60))
        .unwrap();
    for pad in [false, true] {
        client
            .send_to(
                &codec::encode_channel_data(0x4001, b"via channel", pad),
                server,
            )
            .unwrap();
        assert_eq!(recv(&peer), (b"via channel".to_vec(), relayed));
    }
    peer.send_to(b"back", relayed).unwrap();
    let (message, _) = recv(&client);
    assert_eq!(message, codec::encode_channel_data(0x4001, b"back", false));

    // Unbound channel: dropped and counted.
    client
        .send_to(&codec::encode_channel_data(0x4002, b"nope", false), server)
        .unwrap();
    wait_stats(&plane, |s| dropped(s, DropReason::UnknownChannel) == 1);

    // Data from a peer IP without permission: dropped (both peer sockets share 127.0.0.1, so use
    // another loopback address).
    let stranger = UdpSocket::bind("127.0.0.2:0").unwrap();
    stranger.send_to(b"intruder", relayed).unwrap();
    wait_stats(&plane, |s| dropped(s, DropReason::NoPermission) == 2);
    nothing_arrives(&client);

    let stats = plane.stats();
    assert_eq!(stats.traffic.packets_to_peers, 3);
    assert_eq!(stats.traffic.packets_to_client, 2);
    let allocations = plane.allocation_stats();
    assert_eq!(allocations.len(), 1);
    let a = &allocations[0];
    assert_eq!(
        (a.client, a.relayed, a.channels, a.permissions),
        (client_addr, relayed, 1, 1)
    );
    assert_eq!(a.traffic.bytes_to_peers, (10 + 11 + 11) as u64);
    assert_eq!(a.traffic.bytes_to_client, (12 + 4) as u64);
    assert_eq!(a.traffic.dropped(DropReason::NoPermission), 2);
    assert!(a.last_activity_ms >= a.created_ms);

    assert!(plane.release(client_addr));
    assert!(!plane.release(client_addr));
    assert!(plane.allocation_stats().is_empty());
    // After release the client's data is no longer relayed.
    client
        .send_to(&codec::encode_channel_data(0x4001, b"gone", false), server)
        .unwrap();
    wait_stats(&plane, |s| dropped(s, DropReason::NoAllocation) == 1);
}

#[test]
fn stun_goes_up_garbage_is_counted_replies_go_out() {
    let plane = plane();
    let server = plane.local_addr();
    let client = socket();
    let mut binding = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    binding.extend_from_slice(&[3u8; 12]);
    client.send_to(&binding, server).unwrap();
    let got = plane.recv_control(WAIT, 16);
    assert_eq!(got, vec![(binding.clone(), client.local_addr().unwrap())]);
    assert!(plane.recv_control(Duration::from_millis(10), 16).is_empty());

    for garbage in [
        &b"\xff\xff"[..],
        b"",
        b"\x40\x00\x00\x09abc",
        &binding[..19],
        b"GET / HTTP/1.1",
    ] {
        client.send_to(garbage, server).unwrap();
    }
    wait_stats(&plane, |s| dropped(s, DropReason::Malformed) == 5);

    plane
        .send_to_client(b"response", client.local_addr().unwrap())
        .unwrap();
    assert_eq!(recv(&client), (b"response".to_vec(), server));
    assert_eq!(plane.stats().control_replies, 1);
}

#[test]
fn the_control_queue_is_bounded() {
    let mut config = Config::new("127.0.0.1:0".parse().unwrap());
    config.control_queue = 3;
    let plane = DataPlane::start(config).unwrap();
    let client = socket();
    let mut binding = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    binding.extend_from_slice(&[3u8; 12]);
    for _ in 0..10 {
        client.send_to(&binding, plane.local_addr()).unwrap();
    }
    let stats = wait_stats(&plane, |s| s.client_datagrams == 10);
    assert_eq!(stats.control_messages, 3);
    assert_eq!(dropped(&stats, DropReason::ControlQueueFull), 7);
    assert_eq!(plane.recv_control(WAIT, 2).len(), 2);
    assert_eq!(plane.recv_control(WAIT, 100).len(), 1);
}

#[test]
fn expired_permissions_and_channels_stop_forwarding() {
    let plane = plane();
    let server = plane.local_addr();
    let (client, peer) = (socket(), socket());
    let (client_addr, peer_addr) = (client.local_addr().unwrap(), peer.local_addr().unwrap());
    let relayed = plane.allocate(client_addr, 0, false).unwrap();
    plane
        .bind_channel(client_addr, 0x4000, peer_addr, Duration::from_millis(100))
        .unwrap();
    client
        .send_to(
            &codec::encode_channel_data(0x4000, b"in time", false),
            server,
        )
        .unwrap();
    assert_eq!(recv(&peer).0, b"in time");
    std::thread::sleep(Duration::from_millis(150));
    client
        .send_to(
            &codec::encode_channel_data(0x4000, b"too late", false),
            server,
        )
        .unwrap();
    client
        .send_to(
            &codec::encode_send_indication(&[0; 12], peer_addr, b"too late"),
            server,
        )
        .unwrap();
    peer.send_to(b"too late", relayed).unwrap();
    let stats = wait_stats(&plane, |s| {
        dropped(s, DropReason::UnknownChannel) == 1 && dropped(s, DropReason::NoPermission) == 2
    });
    assert_eq!(stats.traffic.packets_to_peers, 1);
    nothing_arrives(&peer);
    nothing_arrives(&client);
}

#[test]
fn quota_drops_the_excess_and_spares_the_neighbour() {
    let plane = plane();
    let server = plane.local_addr();
    let (flooder, honest, peer) = (socket(), socket(), socket());
    let peer_addr = peer.local_addr().unwrap();
    let rate = 50_000;
    for (client, quota) in [(&flooder, rate), (&honest, 0)] {
        let addr = client.local_addr().unwrap();
        plane.allocate(addr, quota, false).unwrap();
        plane
            .add_permission(addr, peer_addr.ip(), Duration::from_secs(60))
            .unwrap();
        plane
            .bind_channel(addr, 0x4000, peer_addr, Duration::from_secs(60))
            .unwrap();
    }
    let payload = vec![7u8; 1000];
    let message = codec::encode_channel_data(0x4000, &payload, false);
    let start = Instant::now();
    for i in 0..400 {
        flooder.send_to(&message, server).unwrap();
        if i % 4 == 0 {
            honest.send_to(&message, server).unwrap();
        }
        if i % 50 == 0 {
            // Pace a little so the kernel buffers do not drop anything themselves.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let stats = wait_stats(&plane, |s| s.client_datagrams == 500);
    let elapsed = start.elapsed().as_secs_f64();
    let by_client = |s: &UdpSocket| {
        let addr = s.local_addr().unwrap();
        plane
            .allocation_stats()
            .into_iter()
            .find(|a| a.client == addr)
            .unwrap()
    };
    let f = by_client(&flooder);
    let h = by_client(&honest);
    assert_eq!(
        h.traffic.packets_to_peers, 100,
        "the honest allocation lost packets"
    );
    assert!(f.traffic.dropped(DropReason::Quota) > 0);
    let allowed = (super::table::MIN_BURST as f64 + rate as f64 * elapsed) as u64 + 1000;
    assert!(
        f.traffic.bytes_to_peers <= allowed,
        "{} > {allowed}",
        f.traffic.bytes_to_peers
    );
    assert_eq!(
        f.traffic.packets_to_peers + f.traffic.dropped(DropReason::Quota),
        400
    );
    assert_eq!(
        stats.traffic.dropped(DropReason::Quota),
        f.traffic.dropped(DropReason::Quota)
    );

    // Lifting the quota lets it through again.
    plane.set_quota(flooder.local_addr().unwrap(), 0).unwrap();
    flooder.send_to(&message, server).unwrap();
    wait_stats(&plane, |s| {
        s.traffic.packets_to_peers == stats.traffic.packets_to_peers + 1
    });
}

#[test]
fn relay_port_range_is_used_and_exhaustion_is_an_error() {
    // Find two free adjacent-ish ports by binding and releasing.
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    let base = probe.local_addr().unwrap().port();
    drop(probe);
    let (min, max) = if base < 65_000 {
        (base, base + 1)
    } else {
        (base - 1, base)
    };
    let mut config = Config::new("127.0.0.1:0".parse().unwrap());
    config.relay_ports = (min, max);
    let plane = match DataPlane::start(config) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let mut got = Vec::new();
    for i in 0..2 {
        let client: SocketAddr = format!("127.0.0.1:{}", 40_000 + i).parse().unwrap();
        match plane.allocate(client, 0, false) {
            Ok(relayed) => got.push(relayed.port()),
            // Another process took a port in the range meanwhile: that is exhaustion too.
            Err(RelayError::Io { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(got.iter().all(|p| (min..=max).contains(p)));
    let err = plane
        .allocate("127.0.0.1:40009".parse().unwrap(), 0, false)
        .unwrap_err();
    assert!(err.to_string().contains("exhausted"), "{err}");

    let mut bad = Config::new("127.0.0.1:0".parse().unwrap());
    bad.relay_ports = (10, 5);
    assert!(matches!(DataPlane::start(bad), Err(RelayError::Invalid(_))));
}

#[test]
fn argument_checks() {
    let plane = plane();
    let client: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let peer: SocketAddr = "127.0.0.1:6000".parse().unwrap();
    let minute = Duration::from_secs(60);
    assert!(matches!(
        plane.add_permission(client, peer.ip(), minute),
        Err(RelayError::UnknownAllocation(_))
    ));
    plane.allocate(client, 0, false).unwrap();
    let v6: IpAddr = "::1".parse().unwrap();
    assert!(plane.add_permission(client, v6, minute).is_err());
    assert!(plane
        .add_permission(client, "0.0.0.0".parse().unwrap(), minute)
        .is_err());
    assert!(plane.bind_channel(client, 0x3FFF, peer, minute).is_err());
    assert!(plane.bind_channel(client, 0x5000, peer, minute).is_err());
    assert!(plane
        .bind_channel(client, 0x4000, plane.local_addr(), minute)
        .unwrap_err()
        .to_string()
        .contains("own listening address"));
    plane.bind_channel(client, 0x4000, peer, minute).unwrap();
    assert!(plane
        .bind_channel(client, 0x4000, "127.0.0.1:6001".parse().unwrap(), minute)
        .is_err());
}

#[test]
fn tcp_clients_go_through_the_control_plane() {
    let plane = plane();
    let peer = socket();
    let peer_addr = peer.local_addr().unwrap();
    let client: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let relayed = plane.allocate(client, 0, true).unwrap();
    assert!(!plane.send_from_relay(client, peer_addr, b"x").unwrap());
    plane
        .add_permission(client, peer_addr.ip(), Duration::from_secs(60))
        .unwrap();
    assert!(plane
        .send_from_relay(client, peer_addr, b"over tcp")
        .unwrap());
    assert_eq!(recv(&peer), (b"over tcp".to_vec(), relayed));
    peer.send_to(b"reply", relayed).unwrap();
    let got = plane.recv_tcp(WAIT, 8);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, client);
    assert_eq!(
        codec::decode_data_indication(&got[0].0).unwrap(),
        (peer_addr, &b"reply"[..])
    );
    plane
        .bind_channel(client, 0x4abc, peer_addr, Duration::from_secs(60))
        .unwrap();
    peer.send_to(b"reply", relayed).unwrap();
    let got = plane.recv_tcp(WAIT, 8);
    assert_eq!(got[0].0, codec::encode_channel_data(0x4abc, b"reply", true));
    assert_eq!(got[0].0.len(), 12);
}

#[test]
fn close_is_prompt_and_final() {
    let plane = plane();
    let client: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    plane.allocate(client, 0, false).unwrap();
    let waiter = {
        let start = Instant::now();
        std::thread::scope(|scope| {
            let h = scope.spawn(|| plane.recv_control(Duration::from_secs(30), 8));
            std::thread::sleep(Duration::from_millis(20));
            plane.close();
            assert!(h.join().unwrap().is_empty());
        });
        start.elapsed()
    };
    assert!(waiter < Duration::from_secs(2), "{waiter:?}");
    plane.close();
    assert!(matches!(
        plane.allocate(client, 0, false),
        Err(RelayError::Closed)
    ));
    assert!(matches!(
        plane.send_to_client(b"x", client),
        Err(RelayError::Closed)
    ));
    // The listening port is free again.
    UdpSocket::bind(plane.local_addr()).unwrap();
}

#[test]
fn relayed_to_relayed_between_two_allocations() {
    // Both peers behind the same relay: A's relayed socket talks to B's relayed socket.
    let plane = plane();
    let server = plane.local_addr();
    let (a, b) = (socket(), socket());
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let ra = plane.allocate(a_addr, 0, false).unwrap();
    let rb = plane.allocate(b_addr, 0, false).unwrap();
    let minute = Duration::from_secs(60);
    plane.add_permission(a_addr, rb.ip(), minute).unwrap();
    plane.add_permission(b_addr, ra.ip(), minute).unwrap();
    a.send_to(
        &codec::encode_send_indication(&[5; 12], rb, b"a to b"),
        server,
    )
    .unwrap();
    let (message, _) = recv(&b);
    assert_eq!(
        codec::decode_data_indication(&message).unwrap(),
        (ra, &b"a to b"[..])
    );
}

#[test]
fn own_address_reachable_only_at_live_allocations() {
    // The relay on 127.0.0.2 with its own addresses guarded (the default): clients elsewhere on
    // loopback; a "local service" on the relay's IP that is not an allocation.
    let Ok(plane) = DataPlane::start(Config::new("127.0.0.2:0".parse().unwrap())) else {
        return; // 127.0.0.2 not routable to loopback here
    };
    let server = plane.local_addr();
    let on = |host: &str| {
        let s = UdpSocket::bind(format!("{host}:0")).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    };
    let (a, b, c) = (on("127.0.0.3"), on("127.0.0.3"), on("127.0.0.3"));
    let service = on("127.0.0.2");
    let (a_addr, b_addr, c_addr) = (
        a.local_addr().unwrap(),
        b.local_addr().unwrap(),
        c.local_addr().unwrap(),
    );
    let ra = plane.allocate(a_addr, 0, false).unwrap();
    let rb = plane.allocate(b_addr, 0, false).unwrap();
    let rc = plane.allocate(c_addr, 0, false).unwrap();
    let minute = Duration::from_secs(60);
    for client in [a_addr, b_addr, c_addr] {
        plane.add_permission(client, server.ip(), minute).unwrap();
    }
    let send = |from: &UdpSocket, to: SocketAddr, data: &[u8]| {
        from.send_to(&codec::encode_send_indication(&[6; 12], to, data), server)
            .unwrap();
    };

    // Allocation to allocation, both ways, Send indications and channels.
    send(&a, rb, b"a to b");
    let (message, _) = recv(&b);
    assert_eq!(
        codec::decode_data_indication(&message).unwrap(),
        (ra, &b"a to b"[..])
    );
    plane.bind_channel(b_addr, 0x4000, ra, minute).unwrap();
    b.send_to(
        &codec::encode_channel_data(0x4000, b"b to a", false),
        server,
    )
    .unwrap();
    let (message, _) = recv(&a);
    assert_eq!(
        codec::decode_data_indication(&message).unwrap(),
        (rb, &b"b to a"[..])
    );

    // Any other port on the relay's IP is refused, whatever the permission says: the listening
    // port, a local service, both ways.
    let service_addr = service.local_addr().unwrap();
    assert!(plane
        .bind_channel(a_addr, 0x4001, service_addr, minute)
        .is_err());
    assert!(plane.bind_channel(a_addr, 0x4001, server, minute).is_err());
    send(&a, service_addr, b"to the service");
    send(&a, server, b"to the listener");
    service.send_to(b"from the service", ra).unwrap();
    wait_stats(&plane, |s| dropped(s, DropReason::ForbiddenPeer) == 3);
    nothing_arrives(&service);

    // A freed allocation's port is refused again (its channel stays bound, its data does not
    // pass), and a TCP client's sends follow the same rule.
    plane.bind_channel(c_addr, 0x4002, rb, minute).unwrap();
    assert!(plane.release(b_addr));
    let rebound = UdpSocket::bind(rb).unwrap(); // someone else takes the port
    rebound.set_read_timeout(Some(WAIT)).unwrap();
    send(&a, rb, b"to a freed port");
    c.send_to(&codec::encode_channel_data(0x4002, b"freed", false), server)
        .unwrap();
    wait_stats(&plane, |s| dropped(s, DropReason::ForbiddenPeer) == 5);
    assert!(plane.bind_channel(a_addr, 0x4003, rb, minute).is_err());
    nothing_arrives(&rebound);
    let tcp_client: SocketAddr = "127.0.0.3:9".parse().unwrap();
    let rt = plane.allocate(tcp_client, 0, true).unwrap();
    plane
        .add_permission(tcp_client, server.ip(), minute)
        .unwrap();
    assert!(!plane.send_from_relay(tcp_client, rb, b"x").unwrap());
    assert!(plane.send_from_relay(tcp_client, rc, b"y").unwrap());
    let (message, _) = recv(&c);
    assert_eq!(
        codec::decode_data_indication(&message).unwrap(),
        (rt, &b"y"[..])
    );
}

#[test]
fn sustained_burst_is_relayed_without_loss() {
    // A paced burst through a channel, measuring what the worker keeps up with.
    let plane = plane();
    let server = plane.local_addr();
    let (client, peer) = (socket(), socket());
    let (client_addr, peer_addr) = (client.local_addr().unwrap(), peer.local_addr().unwrap());
    plane.allocate(client_addr, 0, false).unwrap();
    plane
        .bind_channel(client_addr, 0x4000, peer_addr, Duration::from_secs(60))
        .unwrap();
    let message = codec::encode_channel_data(0x4000, &[9u8; 200], false);
    let total = 20_000;
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut got = 0;
        peer.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        while got < total {
            match peer.recv_from(&mut buf) {
                Ok(_) => got += 1,
                Err(_) => break,
            }
        }
        got
    });
    for i in 0..total {
        client.send_to(&message, server).unwrap();
        if i % 64 == 63 {
            std::thread::yield_now();
        }
    }
    let got = reader.join().unwrap();
    let stats = plane.stats();
    // Loopback may drop under pressure at the sockets; the data plane itself must not lose any
    // datagram it received (everything received was forwarded).
    assert_eq!(stats.traffic.packets_to_peers, stats.client_datagrams);
    assert!(got as u64 <= stats.traffic.packets_to_peers);
    assert!(got > total / 2, "only {got} of {total} arrived");
}

/// Saturating load on loopback: one sender thread (sendmmsg), the forwarder, one receiver
/// thread (recvmmsg), for 2 s; prints datagrams/s offered, forwarded and received. First the data
/// plane (ChannelData in, bare payload out), then a forwarder that does nothing but recvmmsg →
/// sendmmsg of the same bytes (the ceiling on this machine).
/// `cargo test --release --manifest-path rust/Cargo.toml relay::tests::throughput -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn throughput() {
    use super::sys::{Outgoing, RecvBatch, SendBatch};
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    const PAYLOAD: usize = 200;
    const SECONDS: f64 = 2.0;

    /// Offer `message` to `target` from `sender` as fast as sendmmsg goes; count what `peer` gets.
    fn drive(
        sender: UdpSocket,
        target: SocketAddr,
        message: &[u8],
        peer: UdpSocket,
    ) -> (u64, u64, f64) {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let receiver = {
            let (stop, received) = (Arc::clone(&stop), Arc::clone(&received));
            std::thread::spawn(move || {
                peer.set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                let mut batch = RecvBatch::new(64, 2048);
                let mut probe = [0u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    if peer.peek_from(&mut probe).is_ok() {
                        received.fetch_add(batch.recv(&peer) as u64, Ordering::Relaxed);
                    }
                }
            })
        };
        let mut send = SendBatch::new(64);
        let out: Vec<Outgoing<'_>> = (0..32)
            .map(|_| Outgoing {
                head: &[],
                body: message,
                pad: 0,
                to: target,
            })
            .collect();
        let (start, mut sent, mut failed) = (Instant::now(), 0u64, 0u64);
        while start.elapsed().as_secs_f64() < SECONDS {
            send.send(sender.as_raw_fd(), &out, |_| failed += 1);
            sent += out.len() as u64;
        }
        let elapsed = start.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        receiver.join().unwrap();
        (sent - failed, received.load(Ordering::Relaxed), elapsed)
    }

    let report = |name: &str, (sent, received, elapsed): (u64, u64, f64), forwarded: u64| {
        println!(
            "{name}: offered {:.0}/s, forwarded {:.0}/s ({:.1} MB/s of payload), received {:.0}/s",
            sent as f64 / elapsed,
            forwarded as f64 / elapsed,
            forwarded as f64 * PAYLOAD as f64 / elapsed / 1e6,
            received as f64 / elapsed,
        );
    };
    let message = codec::encode_channel_data(0x4000, &[1u8; PAYLOAD], false);

    let plane = plane();
    let (sender, peer) = (
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        UdpSocket::bind("127.0.0.1:0").unwrap(),
    );
    let client_addr = sender.local_addr().unwrap();
    plane.allocate(client_addr, 0, false).unwrap();
    plane
        .bind_channel(
            client_addr,
            0x4000,
            peer.local_addr().unwrap(),
            Duration::from_secs(60),
        )
        .unwrap();
    let result = drive(sender, plane.local_addr(), &message, peer);
    report("data plane", result, plane.stats().traffic.packets_to_peers);
    plane.close();

    let forwarder = UdpSocket::bind("127.0.0.1:0").unwrap();
    forwarder.set_nonblocking(true).unwrap();
    sys::set_buffer_sizes(&forwarder, 4 << 20);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let target = forwarder.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let forwarded = Arc::new(AtomicU64::new(0));
    let worker = {
        let (stop, forwarded) = (Arc::clone(&stop), Arc::clone(&forwarded));
        std::thread::spawn(move || {
            let poller = sys::Poller::new().unwrap();
            poller.add(forwarder.as_raw_fd(), 0).unwrap();
            let (mut events, mut tokens) = (Vec::with_capacity(4), Vec::new());
            let mut recv = RecvBatch::new(64, 65_536);
            let mut send = SendBatch::new(64);
            let out = UdpSocket::bind("127.0.0.1:0").unwrap();
            while !stop.load(Ordering::Relaxed) {
                poller.wait(&mut events, &mut tokens, 50);
                let n = recv.recv(&forwarder);
                let msgs: Vec<Outgoing<'_>> = (0..n)
                    .map(|i| Outgoing {
                        head: &[],
                        body: &recv.get(i).0[4..],
                        pad: 0,
                        to: peer_addr,
                    })
                    .collect();
                send.send(out.as_raw_fd(), &msgs, |_| {});
                forwarded.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    let result = drive(
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        target,
        &message,
        peer,
    );
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    report("bare forwarder", result, forwarded.load(Ordering::Relaxed));
}

#[test]
fn ipv6_end_to_end() {
    let Ok(client) = UdpSocket::bind("[::1]:0") else {
        return; // no IPv6 loopback here
    };
    client.set_read_timeout(Some(WAIT)).unwrap();
    let peer = UdpSocket::bind("[::1]:0").unwrap();
    peer.set_read_timeout(Some(WAIT)).unwrap();
    let plane = DataPlane::start(open_config("[::1]:0")).unwrap();
    let server = plane.local_addr();
    let (client_addr, peer_addr) = (client.local_addr().unwrap(), peer.local_addr().unwrap());
    let relayed = plane.allocate(client_addr, 0, false).unwrap();
    assert!(relayed.is_ipv6());
    assert!(plane
        .add_permission(client_addr, "127.0.0.1".parse().unwrap(), WAIT)
        .is_err());
    plane
        .add_permission(client_addr, peer_addr.ip(), WAIT)
        .unwrap();
    client
        .send_to(
            &codec::encode_send_indication(&[8; 12], peer_addr, b"six"),
            server,
        )
        .unwrap();
    assert_eq!(recv(&peer), (b"six".to_vec(), relayed));
    peer.send_to(b"back", relayed).unwrap();
    let (message, _) = recv(&client);
    assert_eq!(
        codec::decode_data_indication(&message).unwrap(),
        (peer_addr, &b"back"[..])
    );
}
