//! Checkpoints and gaps of a fleet, in PostgreSQL (ARCHITECTURE.md §9): what
//! `crate::state::StateStore` keeps in SQLite for a single bridge. Every checkpoint write is
//! fenced: in its transaction, the feed's lease row must still name this instance, with the
//! epoch the feed was started under, unexpired by the database's clock.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::db::Db;
use super::fence::Fence;
use crate::sink::postgres::pg_text;
use crate::state::{Checkpoint, Gap, GapReason, Recorded};

/// The fleet's state tables, through a connection of their own.
pub struct FleetStore {
    db: Db,
    fence: Arc<Fence>,
}

fn seq_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn seq_from(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

impl FleetStore {
    pub fn new(db: Db, fence: Arc<Fence>) -> FleetStore {
        FleetStore { db, fence }
    }

    /// Where messages say the state lives.
    pub fn shown(&self) -> &str {
        &self.db.shown
    }

    /// The checkpoint of `feed` for the stream at `url`, and whether the feed has one for
    /// another URL.
    pub async fn checkpoint(
        &self,
        feed: &str,
        url: &str,
    ) -> Result<(Option<Checkpoint>, bool), String> {
        // A read: tried again once on a new connection when the first one broke.
        match self.checkpoint_once(feed, url).await {
            Err(_) if self.db.broken().await => self.checkpoint_once(feed, url).await,
            result => result,
        }
    }

    async fn checkpoint_once(
        &self,
        feed: &str,
        url: &str,
    ) -> Result<(Option<Checkpoint>, bool), String> {
        let mut held = self.db.client().await?;
        let Some(client) = held.as_mut() else {
            return Err(format!("fleet database {}: not connected", self.db.shown));
        };
        let result = tokio::time::timeout(self.db.timeout, async {
            let rows = client
                .query(
                    "SELECT url, last_event_id, seq, updated_at FROM sse_bridge_checkpoints \
                     WHERE feed = $1",
                    &[&feed],
                )
                .await?;
            let mut found = None;
            let mut other = false;
            for row in rows {
                let row_url: String = row.get(0);
                if row_url == url {
                    found = Some(Checkpoint {
                        feed: feed.to_string(),
                        url: row_url,
                        last_event_id: row.get(1),
                        seq: seq_from(row.get(2)),
                        updated_at: row.get::<_, DateTime<Utc>>(3),
                    });
                } else {
                    other = true;
                }
            }
            Ok::<_, tokio_postgres::Error>((found, other))
        })
        .await;
        self.db.settle(
            &mut held,
            result,
            &format!("reading the checkpoint of feed `{feed}`"),
        )
    }

    /// Writes the checkpoints of the feeds whose lease this instance still holds, in one
    /// transaction that holds those lease rows (`FOR KEY SHARE`: a claim by another instance,
    /// `FOR UPDATE`, cannot take them until it ends; renewals, which change no key, go on). Returns the feeds left out because their lease is gone; each is also
    /// reported to the coordinator. A checkpoint never moves back.
    pub async fn save_checkpoints(
        &self,
        cps: &[Checkpoint],
        epochs: &[Option<i64>],
    ) -> Result<Vec<String>, String> {
        // Idempotent (a checkpoint never moves back): tried again once on a new connection
        // when the first one broke.
        match self.save_checkpoints_once(cps, epochs).await {
            Err(_) if self.db.broken().await => self.save_checkpoints_once(cps, epochs).await,
            result => result,
        }
    }

    /// Each checkpoint is written under its run's epoch (`epochs`, in the same order), never
    /// the epoch the feed holds now: a run that lost its lease cannot pass as a newer one.
    async fn save_checkpoints_once(
        &self,
        cps: &[Checkpoint],
        epochs: &[Option<i64>],
    ) -> Result<Vec<String>, String> {
        let mut feeds = Vec::new();
        let mut fenced = Vec::new();
        let mut run_epochs = Vec::new();
        for (cp, epoch) in cps
            .iter()
            .zip(epochs.iter().chain(std::iter::repeat(&None)))
        {
            match epoch {
                Some(epoch) => {
                    feeds.push(cp.feed.clone());
                    run_epochs.push(*epoch);
                }
                None => fenced.push(cp.feed.clone()),
            }
        }
        if !feeds.is_empty() {
            let mut held = self.db.client().await?;
            let Some(client) = held.as_mut() else {
                return Err(format!("fleet database {}: not connected", self.db.shown));
            };
            let instance = self.fence.instance().to_string();
            let result = tokio::time::timeout(self.db.timeout, async {
                let tx = client.transaction().await?;
                let rows = tx
                    .query(super::fence::HOLDING_SQL, &[&feeds, &run_epochs, &instance])
                    .await?;
                let holding: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                for (cp, epoch) in cps.iter().zip(epochs) {
                    let Some(epoch) = (*epoch).filter(|_| holding.contains(&cp.feed)) else {
                        continue;
                    };
                    tx.execute(
                        "INSERT INTO sse_bridge_checkpoints \
                             (feed, url, last_event_id, seq, updated_at, owner, epoch) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (feed, url) DO UPDATE SET \
                             last_event_id = excluded.last_event_id, seq = excluded.seq, \
                             updated_at = excluded.updated_at, owner = excluded.owner, \
                             epoch = excluded.epoch \
                         WHERE sse_bridge_checkpoints.seq <= excluded.seq",
                        &[
                            &cp.feed,
                            &cp.url,
                            &pg_text(&cp.last_event_id).as_ref(),
                            &seq_sql(cp.seq),
                            &cp.updated_at,
                            &instance,
                            &epoch,
                        ],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok::<_, tokio_postgres::Error>(holding)
            })
            .await;
            let holding = self
                .db
                .settle(&mut held, result, "committing checkpoints")?;
            fenced.extend(feeds.into_iter().filter(|f| !holding.contains(f)));
        }
        for feed in &fenced {
            tracing::warn!(feed = %feed, instance = %self.fence.instance(), "this instance lost the feed's lease: its checkpoint was not written");
            let epoch = cps
                .iter()
                .zip(epochs)
                .find(|(cp, _)| cp.feed == *feed)
                .and_then(|(_, e)| *e);
            if let Some(epoch) = epoch {
                self.fence.report_lost(feed, epoch);
            }
        }
        Ok(fenced)
    }

    /// Records a gap; identical gaps in a row fold into one row with a count, as in the SQLite
    /// state database.
    pub async fn record_gap(&self, gap: &Gap) -> Result<Recorded, String> {
        let mut held = self.db.client().await?;
        let Some(client) = held.as_mut() else {
            return Err(format!("fleet database {}: not connected", self.db.shown));
        };
        let instance = self.fence.instance().to_string();
        let foldable = !matches!(gap.reason, GapReason::ManualChange);
        let result = tokio::time::timeout(self.db.timeout, async {
            let tx = client.transaction().await?;
            // One writer of a feed's gaps at a time: the fold reads the newest row.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('sse-bridge gaps ' || $1::text))",
                &[&gap.feed],
            )
            .await?;
            let newest = if foldable {
                tx.query_opt(
                    "SELECT id, url, reason, last_event_id, repeats FROM sse_bridge_gaps \
                     WHERE feed = $1 ORDER BY id DESC LIMIT 1",
                    &[&gap.feed],
                )
                .await?
            } else {
                None
            };
            let last_event_id = pg_text(&gap.last_event_id);
            let recorded = match newest {
                Some(row)
                    if row.get::<_, String>(1) == gap.url
                        && row.get::<_, String>(2) == gap.reason.as_str()
                        && row.get::<_, String>(3) == last_event_id.as_ref() =>
                {
                    let id: i64 = row.get(0);
                    let repeats: i64 = row.get(4);
                    tx.execute(
                        "UPDATE sse_bridge_gaps SET repeats = repeats + 1, last_at = $2, \
                         seq = greatest(seq, $3) WHERE id = $1",
                        &[&id, &gap.last_at.max(gap.at), &seq_sql(gap.seq)],
                    )
                    .await?;
                    Recorded::Repeat(seq_from(repeats).saturating_add(1))
                }
                _ => {
                    tx.execute(
                        "INSERT INTO sse_bridge_gaps \
                             (feed, url, reason, detail, last_event_id, seq, at, repeats, last_at, instance) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $7, $8)",
                        &[
                            &gap.feed,
                            &gap.url,
                            &gap.reason.as_str(),
                            &pg_text(&gap.detail).as_ref(),
                            &last_event_id.as_ref(),
                            &seq_sql(gap.seq),
                            &gap.at,
                            &instance,
                        ],
                    )
                    .await?;
                    Recorded::New
                }
            };
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(recorded)
        })
        .await;
        self.db.settle(
            &mut held,
            result,
            &format!("recording a gap of feed `{}`", gap.feed),
        )
    }
}
