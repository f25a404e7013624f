//! The PostgreSQL schema of a `postgres` sink: numbered SQL files from `migrations/postgres/`,
//! applied to each events table once, each in a transaction that also records it, under an
//! advisory lock so that two bridges starting at once do not race.

/// `(version, name, SQL)` in order. The SQL names the table through placeholders only
/// (`{table}`, `{prefix}`, `{name}`), filled with the validated table name.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "0001_events",
    include_str!("../../../migrations/postgres/0001_events.sql"),
)];

/// The schema part of `table` with its dot (`events.`), or nothing.
pub(super) fn prefix(table: &str) -> &str {
    match table.rfind('.') {
        Some(i) => &table[..=i],
        None => "",
    }
}

/// The cursor table next to `table`.
pub(super) fn cursors_table(table: &str) -> String {
    format!("{}sse_bridge_cursors", prefix(table))
}

fn fill(sql: &str, table: &str) -> String {
    sql.replace("{table}", table)
        .replace("{prefix}", prefix(table))
        .replace("{name}", &table.replace('.', "_"))
}

/// Brings `table` (a validated name) to the current schema.
pub(super) async fn migrate(
    client: &mut tokio_postgres::Client,
    table: &str,
) -> Result<(), tokio_postgres::Error> {
    let records = format!("{}sse_bridge_schema_migrations", prefix(table));
    if !prefix(table).is_empty() {
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                prefix(table).trim_end_matches('.')
            ))
            .await?;
    }
    let migrations: Vec<(i32, &str, String)> = MIGRATIONS
        .iter()
        .map(|(version, name, sql)| (*version, *name, fill(sql, table)))
        .collect();
    apply(client, &records, table, &migrations).await
}

/// Applies `migrations` (version, name, SQL) to `target` once each, in order, each in a
/// transaction that also records it in `records`; one bridge at a time per target. Shared by
/// every `postgres` sink table and the fleet's tables (`crate::cluster::db`).
pub(crate) async fn apply(
    client: &mut tokio_postgres::Client,
    records: &str,
    target: &str,
    migrations: &[(i32, &str, String)],
) -> Result<(), tokio_postgres::Error> {
    for (version, name, sql) in migrations {
        let tx = client.transaction().await?;
        // Every runner creates the records table if missing: one at a time, or two could
        // both create it.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('sse-bridge schema_migrations'))",
            &[],
        )
        .await?;
        // One bridge at a time per target; released at the end of the transaction.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('sse-bridge migrations ' || $1::text))",
            &[&target],
        )
        .await?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {records} (
                 target     text        NOT NULL,
                 version    integer     NOT NULL,
                 name       text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (target, version)
             )"
        ))
        .await?;
        let done = tx
            .query_opt(
                &format!("SELECT 1 FROM {records} WHERE target = $1 AND version = $2"),
                &[&target, version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                &format!("INSERT INTO {records} (target, version, name) VALUES ($1, $2, $3)"),
                &[&target, version, name],
            )
            .await?;
            tracing::info!(target, migration = name, "applied a schema migration");
        }
        tx.commit().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_take_the_validated_name() {
        assert_eq!(prefix("sse_events"), "");
        assert_eq!(prefix("events.sse"), "events.");
        assert_eq!(cursors_table("events.sse"), "events.sse_bridge_cursors");
        let sql = fill("CREATE INDEX {name}_x ON {table}; {prefix}c", "events.sse");
        assert_eq!(sql, "CREATE INDEX events_sse_x ON events.sse; events.c");
        assert!(!MIGRATIONS[0].2.is_empty());
    }
}
