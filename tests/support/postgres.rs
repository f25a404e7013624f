//! A database of its own on the machine's PostgreSQL (127.0.0.1:5432, user `postgres`, trust
//! auth), dropped at the end. Without a server, [`TestDb::create`] prints a loud note and
//! returns `None`, unless one is required (`CI` or `SSE_BRIDGE_REQUIRE_POSTGRES=1`): then it
//! panics.
//!
//! Included with `#[path = "support/postgres.rs"] mod postgres;` next to `mod support;`.
#![allow(dead_code)]

const ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5";

fn required() -> bool {
    let set = |v: &str| {
        std::env::var(v)
            .is_ok_and(|s| !s.is_empty() && s != "0" && !s.eq_ignore_ascii_case("false"))
    };
    set("CI") || set("SSE_BRIDGE_REQUIRE_POSTGRES")
}

fn block_on<F>(f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    // On a thread of its own: callers may be inside a runtime already.
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f)
        })
        .join()
        .expect("postgres helper thread")
    })
}

/// Runs `sql` on database `db` as `postgres`: every row, as text.
pub fn query(db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    try_query(db, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// [`query`], with the server's error as text.
pub fn try_query(db: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let conn = ADMIN.replace("dbname=postgres", &format!("dbname={db}"));
    let sql = sql.to_string();
    block_on(async move {
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        tokio::spawn(connection);
        Ok(client
            .simple_query(&sql)
            .await
            .map_err(|e| match e.as_db_error() {
                Some(db) => db.message().to_string(),
                None => e.to_string(),
            })?
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect())
    })
}

/// A database of its own, dropped at the end.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub fn create(tag: &str) -> Option<TestDb> {
        let reachable = block_on(async {
            tokio_postgres::connect(ADMIN, tokio_postgres::NoTls)
                .await
                .is_ok()
        });
        if !reachable {
            assert!(
                !required(),
                "PostgreSQL is required (CI or SSE_BRIDGE_REQUIRE_POSTGRES) but 127.0.0.1:5432 does not answer"
            );
            eprintln!("\n*** SKIPPED: no PostgreSQL on 127.0.0.1:5432 ***\n");
            return None;
        }
        let name = format!("sse_bridge_it_{tag}_{}", std::process::id());
        query(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
        query("postgres", &format!("CREATE DATABASE {name}"));
        Some(TestDb { name })
    }

    pub fn url(&self) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:5432/{}?sslmode=disable",
            self.name
        )
    }

    /// Rows in `table` (0 while it does not exist yet).
    pub fn count(&self, table: &str) -> u64 {
        try_query(&self.name, &format!("SELECT count(*) FROM {table}"))
            .ok()
            .and_then(|rows| rows.into_iter().next())
            .and_then(|r| r.into_iter().next().flatten())
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    /// The first column of every row of `sql`, as text.
    pub fn column(&self, sql: &str) -> Vec<String> {
        query(&self.name, sql)
            .into_iter()
            .map(|r| r.into_iter().next().flatten().unwrap_or_default())
            .collect()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        query(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}
