//! `token_command`: a bearer token printed by a program the operator names, run at every
//! connection attempt (a credential helper that refreshes short-lived tokens). Its output is a
//! [`Secret`] at once and never logged; a failure says how the program ended and the first line
//! of its stderr (the caller scrubs it of the feed's secrets), never its stdout.
//!
//! The program runs on a blocking thread with a deadline: it cannot stall the feed, and one that
//! overruns is killed (ARCHITECTURE.md, "Hostile input and bounded resources": every wait has a
//! bound). Its output is read up to [`MAX_OUTPUT`] bytes.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::secret::Secret;

/// How long the program may run.
pub const TOKEN_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Output read from each of stdout and stderr: a token is short, and a runaway program must not
/// fill memory.
pub const MAX_OUTPUT: u64 = 64 * 1024;

/// How a run failed. Never contains the program's stdout.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("token_command is empty")]
    NoProgram,
    #[error("token_command `{program}` could not be started: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token_command `{program}` did not finish within {}, so it was killed", humantime::format_duration(*.timeout))]
    Timeout { program: String, timeout: Duration },
    #[error("token_command `{program}` failed ({status}){}", .stderr.as_ref().map(|l| format!(": {l}")).unwrap_or_default())]
    Failed {
        program: String,
        /// `exit status: 3`, `signal: 9 (SIGKILL)`.
        status: String,
        /// The first non-empty line of stderr, at most 200 characters.
        stderr: Option<String>,
    },
    #[error("token_command `{program}` printed no token on stdout")]
    Empty { program: String },
    #[error("token_command `{program}` printed a token that is not UTF-8")]
    NotUtf8 { program: String },
}

/// Runs `argv` (program and arguments, no shell) and returns its stdout, trimmed, as the token.
pub async fn run(argv: &[String], timeout: Duration) -> Result<Secret, CommandError> {
    let argv = argv.to_vec();
    let program = argv.first().cloned().unwrap_or_default();
    match tokio::task::spawn_blocking(move || run_blocking(&argv, timeout)).await {
        Ok(result) => result,
        Err(e) => Err(CommandError::Spawn {
            program,
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

fn run_blocking(argv: &[String], timeout: Duration) -> Result<Secret, CommandError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(CommandError::NoProgram);
    };
    let deadline = Instant::now() + timeout;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Spawn {
            program: program.clone(),
            source,
        })?;
    // Each pipe drained by a thread of its own, so a chatty program never blocks on a full
    // pipe while we wait for it to exit.
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let pipes: [(bool, Option<Box<dyn Read + Send>>); 2] = [
        (true, child.stdout.take().map(|p| Box::new(p) as _)),
        (false, child.stderr.take().map(|p| Box::new(p) as _)),
    ];
    for (is_stdout, pipe) in pipes {
        let tx = tx.clone();
        if let Some(pipe) = pipe {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.take(MAX_OUTPUT).read_to_end(&mut bytes);
                let _ = tx.send((is_stdout, bytes));
            });
        }
    }
    drop(tx);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(match other {
                    Err(source) => CommandError::Spawn {
                        program: program.clone(),
                        source,
                    },
                    _ => CommandError::Timeout {
                        program: program.clone(),
                        timeout,
                    },
                });
            }
        }
    };
    // A child the program left running may hold the pipes open: wait for them only briefly.
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let until = Instant::now() + Duration::from_millis(500);
    for _ in 0..2 {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok((true, bytes)) => stdout = bytes,
            Ok((false, bytes)) => stderr = bytes,
            Err(_) => break,
        }
    }
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| l.chars().take(200).collect());
        return Err(CommandError::Failed {
            program: program.clone(),
            status: status.to_string(),
            stderr,
        });
    }
    let text = String::from_utf8(stdout).map_err(|_| CommandError::NotUtf8 {
        program: program.clone(),
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CommandError::Empty {
            program: program.clone(),
        });
    }
    Ok(Secret::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn stdout_trimmed_is_the_token() {
        let token = run(&sh("printf '  tok-123\\n\\n'"), TOKEN_COMMAND_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(token.expose(), "tok-123");
    }

    #[tokio::test]
    async fn failures_say_how_the_program_ended_and_never_its_stdout() {
        let err = run(
            &sh(
                "echo tok-leaked; echo >&2; echo '  denied: no grant  ' >&2; echo more >&2; exit 3",
            ),
            TOKEN_COMMAND_TIMEOUT,
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "token_command `/bin/sh` failed (exit status: 3): denied: no grant"
        );
        let err = run(&sh("true"), TOKEN_COMMAND_TIMEOUT).await.unwrap_err();
        assert!(err.to_string().contains("printed no token"), "{err}");
        let err = run(&["/nonexistent/helper".into()], TOKEN_COMMAND_TIMEOUT)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("token_command `/nonexistent/helper` could not be started"),
            "{err}"
        );
        assert!(matches!(
            run(&[], TOKEN_COMMAND_TIMEOUT).await,
            Err(CommandError::NoProgram)
        ));
    }

    #[tokio::test]
    async fn a_program_that_overruns_is_killed() {
        let started = Instant::now();
        let err = run(&sh("sleep 30"), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("within 200ms"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
