//! One bridge per state database: an exclusive `flock` on a lock file beside it.
//!
//! Two bridges on one state database would both read every feed and both commit checkpoints:
//! events stored twice and checkpoints moving backwards. `run` takes the lock before it opens
//! anything and holds it until it exits (the kernel drops it when the process dies, kill -9
//! included, so a stale lock file never blocks a restart). Commands that change checkpoints
//! (`checkpoints set|reset`) take it too, so they cannot race a running bridge.
//!
//! The lock file is `STATE_PATH.lock`; it holds the PID of the holder, for the error message
//! of the one that is refused. It is opened without following symbolic links.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "another sse-bridge{holder} is already using the state database {state} (lock file {lock}); \
         stop it first, or give this one its own `state.path`"
    )]
    Held {
        state: String,
        lock: String,
        /// ` (PID n)` when the lock file names its holder.
        holder: String,
    },
    /// The lock file could not be created or locked.
    #[error("cannot lock the state database {state} (lock file {lock}): {source}")]
    Io {
        state: String,
        lock: String,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// The lock file of the state database at `state`.
    pub fn path_for(state: &Path) -> PathBuf {
        let mut name = state.as_os_str().to_os_string();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// Takes the lock of the state database at `state` without waiting, creating the lock
    /// file (and its directory) if needed, and writes this process's PID into it.
    pub fn acquire(state: &Path) -> Result<StateLock, LockError> {
        let path = Self::path_for(state);
        let io = |source: std::io::Error| LockError::Io {
            state: state.display().to_string(),
            lock: path.display().to_string(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!(" (PID {pid})"),
                    Err(_) => String::new(),
                };
                return Err(LockError::Held {
                    state: state.display().to_string(),
                    lock: path.display().to_string(),
                    holder,
                });
            }
            return Err(io(err));
        }
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(io)?;
        Ok(StateLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("sub/state.db");
        let first = StateLock::acquire(&state).unwrap();
        assert_eq!(first.path(), dir.path().join("sub/state.db.lock"));
        // flock locks belong to the open file description: a second open in the same process
        // conflicts just as another process would.
        let err = StateLock::acquire(&state).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LockError::Held { .. }), "{text}");
        assert!(
            text.contains(&format!("(PID {})", std::process::id())),
            "{text}"
        );
        assert!(text.contains("state.db"), "{text}");
        drop(first);
        let again = StateLock::acquire(&state).unwrap();
        drop(again);
    }

    #[test]
    fn a_symlinked_lock_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "precious").unwrap();
        let state = dir.path().join("state.db");
        std::os::unix::fs::symlink(&target, StateLock::path_for(&state)).unwrap();
        let err = StateLock::acquire(&state).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    }
}
