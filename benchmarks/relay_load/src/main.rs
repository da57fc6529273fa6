//! relay-load: the relay benchmarks' load generator and bare forwarder (issue 5).
//!
//! ```text
//! relay-load drive --server ADDR --clients FD,FD,… --sink FD --ping FD --echo FD
//!                  [--watch PID] [--max-seconds S]
//!     stdin, one command a line:  run RATE SECONDS SIZE [PING_INTERVAL_US]
//!     stdout, one JSON object a line per command
//! relay-load forward --route CHANNEL=ADDR … [--max-seconds S]
//!     prints "ready PORT", forwards until stdin closes or S seconds pass
//! ```
//!
//! Loopback only: every address given must be 127.0.0.0/8 or ::1, and the process exits by
//! itself after `--max-seconds` (default 600) whatever its parent does.

mod drive;
mod forward;
mod mmsg;

use std::io::{BufRead, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::FromRawFd;
use std::process::exit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAX_STEP_SECONDS: f64 = 30.0;
const MAX_SIZE: usize = 1400;

fn fail(message: &str) -> ! {
    eprintln!("relay-load: {message}");
    exit(2)
}

fn loopback(text: &str) -> SocketAddr {
    let addr: SocketAddr = text
        .parse()
        .unwrap_or_else(|_| fail(&format!("not an address: {text}")));
    if !addr.ip().is_loopback() {
        fail(&format!("{addr} is not a loopback address"));
    }
    addr
}

fn socket_from_fd(text: &str) -> UdpSocket {
    let fd: i32 = text
        .parse()
        .unwrap_or_else(|_| fail(&format!("not a file descriptor: {text}")));
    // SAFETY: the parent handed this descriptor over for this process to own.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    match socket.local_addr() {
        Ok(addr) if addr.ip().is_loopback() => socket,
        _ => fail(&format!(
            "descriptor {fd} is not a UDP socket bound to loopback"
        )),
    }
}

/// `--name value` pairs; a name may repeat.
fn options(args: &[String]) -> Vec<(String, String)> {
    args.chunks(2)
        .map(|pair| match pair {
            [name, value] if name.starts_with("--") => (name[2..].to_string(), value.clone()),
            _ => fail(&format!("expected --name value pairs, got {pair:?}")),
        })
        .collect()
}

fn one<'a>(options: &'a [(String, String)], name: &str) -> Option<&'a str> {
    options
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn required<'a>(options: &'a [(String, String)], name: &str) -> &'a str {
    one(options, name).unwrap_or_else(|| fail(&format!("--{name} is required")))
}

/// Exit after `seconds` whatever happens: no load outlives its benchmark.
fn watchdog(options: &[(String, String)]) -> Instant {
    let seconds: u64 = one(options, "max-seconds")
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| fail("--max-seconds: a number"))
        })
        .unwrap_or(600);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        eprintln!("relay-load: --max-seconds {seconds} reached, exiting");
        exit(3);
    });
    Instant::now() + Duration::from_secs(seconds)
}

fn drive_command(options: &[(String, String)]) {
    watchdog(options);
    let sockets = drive::Sockets {
        server: loopback(required(options, "server")),
        clients: required(options, "clients")
            .split(',')
            .map(socket_from_fd)
            .collect(),
        sink: socket_from_fd(required(options, "sink")),
        ping: socket_from_fd(required(options, "ping")),
        echo: socket_from_fd(required(options, "echo")),
        watch: one(options, "watch").map(|p| p.parse().unwrap_or_else(|_| fail("--watch: a pid"))),
    };
    // Short sleeps while pacing: ask for 1 µs timer slack instead of the default 50 µs.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    let mut driver = drive::Driver::start(sockets).unwrap_or_else(|e| fail(&e.to_string()));
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |i: usize| -> f64 {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| fail(&format!("bad command: {line}")))
        };
        if words.first() != Some(&"run") || !(4..=5).contains(&words.len()) {
            fail(&format!("bad command: {line}"));
        }
        let (rate, seconds, size) = (number(1), number(2), number(3) as usize);
        if rate < 0.0
            || !(0.0..=MAX_STEP_SECONDS).contains(&seconds)
            || !(8..=MAX_SIZE).contains(&size)
        {
            fail(&format!("out of bounds: {line}"));
        }
        let ping = (words.len() == 5).then(|| Duration::from_micros(number(4) as u64));
        let step = driver.run(rate, seconds, size, ping);
        let rtts: Vec<String> = step.rtt_ns.iter().map(u64::to_string).collect();
        let mut out = stdout.lock();
        let _ = writeln!(
            out,
            "{{\"offered\": {}, \"received\": {}, \"received_bytes\": {}, \"elapsed\": {:.6}, \
             \"cpu_user\": {:.4}, \"cpu_system\": {:.4}, \"pings_lost\": {}, \"rtt_ns\": [{}]}}",
            step.offered,
            step.received,
            step.received_bytes,
            step.elapsed,
            step.cpu.0,
            step.cpu.1,
            step.pings_lost,
            rtts.join(", ")
        );
        let _ = out.flush();
    }
}

fn forward_command(options: &[(String, String)]) {
    let deadline = watchdog(options);
    let routes: Vec<(u16, SocketAddr)> = options
        .iter()
        .filter(|(name, _)| name == "route")
        .map(|(_, value)| {
            let (channel, addr) = value
                .split_once('=')
                .unwrap_or_else(|| fail("--route CHANNEL=ADDR"));
            let channel = channel
                .parse()
                .unwrap_or_else(|_| fail("--route: CHANNEL is a number"));
            (channel, loopback(addr))
        })
        .collect();
    if routes.is_empty() {
        fail("give at least one --route CHANNEL=ADDR");
    }
    let client = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&e.to_string()));
    let port = client.local_addr().map(|a| a.port()).unwrap_or(0);
    println!("ready {port}");
    let _ = std::io::stdout().flush();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            stop.store(true, Ordering::Relaxed);
        });
    }
    forward::run(&client, &routes, &stop, deadline);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("drive") => drive_command(&options(&args[1..])),
        Some("forward") => forward_command(&options(&args[1..])),
        _ => fail("usage: relay-load drive … | relay-load forward … (see the source's header)"),
    }
}
