//! The systemd notification protocol (`sd_notify`), spoken directly: one datagram per message
//! to the Unix socket named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace). Without `NOTIFY_SOCKET` (not started by systemd with `Type=notify`) every call is
//! a no-op.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to the service manager, if there is one.
pub struct Notifier {
    socket: Option<(UnixDatagram, String)>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`. An unusable socket is logged and treated as absent: the bridge
    /// does not refuse to run because systemd cannot be told about it.
    pub fn from_env() -> Notifier {
        let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { socket: None };
        };
        let addr = addr.to_string_lossy().into_owned();
        match UnixDatagram::unbound() {
            Ok(sock) => Notifier {
                socket: Some((sock, addr)),
            },
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET is set but no socket could be created: {e}");
                Notifier { socket: None }
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends one message such as `READY=1` or `STATUS=3/3 feeds open`.
    pub fn send(&self, message: &str) {
        let Some((sock, addr)) = &self.socket else {
            return;
        };
        let result = if let Some(name) = addr.strip_prefix('@') {
            send_abstract(sock, name, message)
        } else {
            sock.send_to(message.as_bytes(), addr).map(|_| ())
        };
        if let Err(e) = result {
            tracing::warn!("cannot notify systemd at {addr}: {e}");
        }
    }

    pub fn ready(&self) {
        self.send("READY=1");
    }

    pub fn status(&self, text: &str) {
        // A status is one line.
        let text = text.replace('\n', " ");
        self.send(&format!("STATUS={text}"));
    }

    /// Announces a reload (with the monotonic timestamp `Type=notify-reload` asks for).
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

/// How often to pet the watchdog: half of `WATCHDOG_USEC` when systemd set one for this
/// process (`WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(target_os = "linux")]
fn send_abstract(sock: &UnixDatagram, name: &str, message: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    sock.send_to_addr(message.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_sock: &UnixDatagram, _name: &str, _message: &str) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

/// CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which lives on our stack.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_arrive_on_a_real_datagram_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier {
            socket: Some((
                UnixDatagram::unbound().expect("socket"),
                path.display().to_string(),
            )),
        };
        notifier.ready();
        notifier.status("1/2 feeds open\nsecond line");
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STATUS=1/2 feeds open second line");
    }

    #[test]
    fn without_notify_socket_nothing_happens() {
        let n = Notifier { socket: None };
        assert!(!n.enabled());
        n.ready();
    }
}
