//! One connection to the fleet's database, opened again after any failure, and the schema
//! of the fleet's tables (`migrations/cluster/`).

use std::time::Duration;

use tokio::sync::{mpsc, Mutex, MutexGuard};
use tokio_postgres::Client;

use crate::sink::postgres::describe;

/// `(version, name, SQL)` in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "0001_fleet",
    include_str!("../../migrations/cluster/0001_fleet.sql"),
)];

/// The `target` the fleet's migrations are recorded under in `sse_bridge_schema_migrations`
/// (the table the `postgres` sink records its own in).
const TARGET: &str = "sse-bridge cluster";

/// A connection that reconnects: each user takes it for one exchange ([`Db::client`]) and
/// reports a failure ([`Db::failed`]), after which the next exchange connects again.
pub struct Db {
    connection: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// user@host:port/database, never the password.
    pub shown: String,
    client: Mutex<Option<Client>>,
    /// The longest one exchange may take before the connection is given up.
    pub timeout: Duration,
    /// Where notifications on [`LEASES_CHANNEL`] go, when this connection listens for them.
    listen: Option<mpsc::Sender<String>>,
}

/// The channel an instance notifies when it releases leases, so that the others claim them
/// at once instead of at their next round.
pub const LEASES_CHANNEL: &str = "sse_bridge_leases";

/// The connection, held for one exchange.
pub type Held<'a> = MutexGuard<'a, Option<Client>>;

impl Db {
    pub fn new(
        connection: tokio_postgres::Config,
        tls: tokio_postgres_rustls::MakeRustlsConnect,
        timeout: Duration,
    ) -> Db {
        Db {
            shown: crate::sink::postgres::config::shown(&connection),
            connection,
            tls,
            client: Mutex::new(None),
            timeout,
            listen: None,
        }
    }

    /// Listens on [`LEASES_CHANNEL`] on every connection it opens; each notification's
    /// payload (the releasing instance) is sent to `to`.
    /// Anyone who can connect to the database can `NOTIFY`: a full channel drops the
    /// notification (a round is coming anyway), so a flood costs no memory.
    pub fn listening(mut self, to: mpsc::Sender<String>) -> Db {
        self.listen = Some(to);
        // A connection opened before (the migrations') does not listen: the next exchange
        // opens one that does.
        *self.client.get_mut() = None;
        self
    }

    /// The open connection, connecting first when there is none (or it broke).
    pub async fn client(&self) -> Result<Held<'_>, String> {
        let mut held = self.client.lock().await;
        if held.as_ref().is_none_or(Client::is_closed) {
            *held = None;
            let began = std::time::Instant::now();
            let (client, mut connection) =
                tokio::time::timeout(self.timeout, self.connection.connect(self.tls.clone()))
                    .await
                    .map_err(|_| format!("cannot connect to {}: no answer in time", self.shown))?
                    .map_err(|e| describe(&format!("cannot connect to {}", self.shown), &e))?;
            let shown = self.shown.clone();
            let listen = self.listen.clone();
            tokio::spawn(async move {
                loop {
                    let message =
                        futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await;
                    match message {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                            if let Some(to) = &listen {
                                // Only an instance name is of use (at most 128 bytes).
                                let payload: String = n.payload().chars().take(128).collect();
                                let _ = to.try_send(payload);
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::debug!(database = %shown, "fleet database connection ended: {e}");
                            return;
                        }
                        None => return,
                    }
                }
            });
            if self.listen.is_some() {
                let listened = tokio::time::timeout(
                    self.timeout,
                    client.batch_execute(&format!("LISTEN {LEASES_CHANNEL}")),
                )
                .await;
                match listened {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        return Err(describe(&format!("{}: cannot LISTEN", self.shown), &e))
                    }
                    Err(_) => return Err(format!("{}: no answer in time to LISTEN", self.shown)),
                }
            }
            tracing::debug!(database = %self.shown, elapsed = ?began.elapsed(), "connected to the fleet database");
            *held = Some(client);
        }
        Ok(held)
    }

    /// Forgets the connection (after an exchange that took too long).
    pub async fn reset(&self) {
        *self.client.lock().await = None;
    }

    /// Forgets the connection after an error that may have broken it; a refusal by the
    /// server (a constraint, a permission) keeps it.
    pub fn failed(held: &mut Held<'_>, e: &tokio_postgres::Error) {
        // SQLSTATE classes 08 (connection exception) and 57 (operator intervention, such as
        // pg_terminate_backend) end the session too.
        let ended = e.as_db_error().is_none_or(|db| {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57")
        });
        if e.is_closed() || ended {
            **held = None;
        }
    }

    /// The outcome of one exchange bounded by a timeout: a failure or a timeout forgets a
    /// connection it may have broken; `what` says what was being done, for the message.
    pub fn settle<T>(
        &self,
        held: &mut Held<'_>,
        result: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
        what: &str,
    ) -> Result<T, String> {
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                Db::failed(held, &e);
                Err(describe(
                    &format!("fleet database {}: {what}", self.shown),
                    &e,
                ))
            }
            Err(_) => {
                **held = None;
                Err(format!(
                    "fleet database {}: no answer in time {what}",
                    self.shown
                ))
            }
        }
    }

    /// Whether there is no usable connection now (the last exchange broke it): an idempotent
    /// exchange that failed is worth one more try on a new connection.
    pub async fn broken(&self) -> bool {
        self.client
            .lock()
            .await
            .as_ref()
            .is_none_or(Client::is_closed)
    }

    /// Brings the fleet's tables to the current schema, under an advisory lock so that
    /// instances starting at once do not race.
    pub async fn migrate(&self) -> Result<(), String> {
        let mut held = self.client().await?;
        let Some(client) = held.as_mut() else {
            return Err(format!("{}: not connected", self.shown));
        };
        let result = migrate(client).await;
        if let Err(e) = &result {
            Db::failed(&mut held, e);
        }
        result.map_err(|e| {
            describe(
                &format!("cannot prepare the fleet's tables in {}", self.shown),
                &e,
            )
        })
    }
}

async fn migrate(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let migrations: Vec<(i32, &str, String)> = MIGRATIONS
        .iter()
        .map(|(version, name, sql)| (*version, *name, sql.to_string()))
        .collect();
    crate::sink::postgres::schema::apply(
        client,
        "sse_bridge_schema_migrations",
        TARGET,
        &migrations,
    )
    .await
}
