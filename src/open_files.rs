//! The process's open-file limit: raising it to the hard limit, and sizing the connection caps
//! of the HTTP endpoints (`serve`, the admin endpoint) so that they never take the descriptors
//! the feeds, sinks and databases need. See ARCHITECTURE.md, "Hostile input and bounded
//! resources".

/// The soft open-file limit (`RLIMIT_NOFILE`), or `None` when it cannot be read or is
/// unlimited.
pub fn soft_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Raises the soft open-file limit to the hard limit, as servers commonly do: every feed and
/// every client connection holds a socket (and file sinks hold files), and the usual soft
/// default of 1024 would fail in odd ways long before memory runs out. Returns the soft limit
/// in force afterwards (`None` when it cannot be read or is unlimited).
pub fn raise_to_hard_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::debug!(
            "cannot read the open-file limit: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let before = limit.rlim_cur;
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(
                from = before,
                to = raised.rlim_cur,
                "raised the open-file limit"
            );
            limit = raised;
        } else {
            tracing::debug!(
                "cannot raise the open-file limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Descriptors kept for everything that is not a feed's socket or an admin connection: the
/// state database and its `-wal`/`-shm`, sink files and databases, Kafka's sockets, the
/// listeners, standard streams, the runtime's own.
pub const BRIDGE_RESERVE: u64 = 128;

/// The fewest admin connections allowed, however short the descriptors: a health probe must
/// still get through.
pub const MIN_ADMIN_CONNECTIONS: usize = 4;

/// The admin endpoint's connection cap: `configured`, lowered so that the admin endpoint takes
/// at most half of the descriptors left once every feed has two (its socket, and a second
/// while it reconnects) and [`BRIDGE_RESERVE`] are set aside; never below
/// [`MIN_ADMIN_CONNECTIONS`]. `limit` is the soft open-file limit (`None`: unlimited).
pub fn admin_cap(configured: usize, limit: Option<u64>, feeds: usize) -> usize {
    let Some(limit) = limit else {
        return configured;
    };
    let spare = limit.saturating_sub(2 * feeds as u64 + BRIDGE_RESERVE) / 2;
    let spare = usize::try_from(spare).unwrap_or(usize::MAX);
    configured.min(spare.max(MIN_ADMIN_CONNECTIONS))
}

/// `serve`'s client cap: `configured`, lowered so that every client's socket fits in the
/// open-file limit next to `reserve` descriptors (databases, listener, standard streams).
pub fn serve_cap(configured: usize, limit: Option<u64>, reserve: u64) -> usize {
    let Some(limit) = limit else {
        return configured;
    };
    let spare = usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
    configured.min(spare.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_cap_leaves_descriptors_for_the_feeds() {
        // Plenty: the configured cap.
        assert_eq!(admin_cap(64, Some(1 << 20), 100), 64);
        assert_eq!(admin_cap(64, None, 100), 64);
        // 512 descriptors, 100 feeds: (512 - 200 - 128) / 2 = 92, so 64 stays.
        assert_eq!(admin_cap(64, Some(512), 100), 64);
        // 512 descriptors, 150 feeds: (512 - 300 - 128) / 2 = 42.
        assert_eq!(admin_cap(64, Some(512), 150), 42);
        // Nothing to spare: the floor, so that a probe still gets through.
        assert_eq!(admin_cap(64, Some(256), 500), MIN_ADMIN_CONNECTIONS);
        // The floor never raises a smaller configured cap.
        assert_eq!(admin_cap(2, Some(256), 500), 2);
    }

    #[test]
    fn the_serve_cap_fits_in_the_limit() {
        assert_eq!(serve_cap(1024, Some(1 << 20), 64), 1024);
        assert_eq!(serve_cap(1024, Some(512), 64), 448);
        assert_eq!(serve_cap(1024, Some(10), 64), 1);
        assert_eq!(serve_cap(1024, None, 64), 1024);
    }
}
