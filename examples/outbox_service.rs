//! A service that writes its business row and the outbox row in one
//! transaction, then a relay that publishes the outbox to a JSON lines file.
//! If the transaction rolls back, neither row exists: no event without its
//! change, no change without its event.
//!
//! On SQLite (a temporary file, no servers):
//!
//! ```sh
//! cargo run --example outbox_service
//! ```
//!
//! On PostgreSQL (a schema of its own, dropped afterwards):
//!
//! ```sh
//! OMNIBOX_EXAMPLE_DATABASE_URL=postgres://app@127.0.0.1/app cargo run --example outbox_service
//! ```

use std::sync::Arc;
use std::time::Duration;

use omnibox::prelude::*;
use uuid::Uuid;

fn order_created(order_id: Uuid, total: f64) -> omnibox::Result<OutboxEvent> {
    DomainService::default().create_outbox_event(NewOutboxEvent::new(
        "order",
        order_id,
        "order.created",
        "orders",
        order_id.to_string(),
        serde_json::json!({"order_id": order_id, "total": total}),
    ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("omnibox-example-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let mut pg_schema = None;
    let store = match std::env::var("OMNIBOX_EXAMPLE_DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            let schema = format!("example_{}", Uuid::new_v4().simple());
            pg_schema = Some(schema.clone());
            let opts = PgOptions {
                schema: Some(schema),
                ..PgOptions::default()
            };
            let pg = PgStore::connect(&url, &opts).await?;
            pg.migrate().await?;
            sqlx::query("CREATE TABLE orders (id uuid PRIMARY KEY, total float8 NOT NULL)")
                .execute(pg.pool())
                .await?;
            AnyStore::Postgres(pg)
        }
        _ => {
            let url = format!("sqlite://{}", dir.join("shop.db").display());
            let sqlite = SqliteStore::connect(&url).await?;
            sqlite.migrate().await?;
            sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, total REAL NOT NULL)")
                .execute(sqlite.pool())
                .await?;
            AnyStore::Sqlite(sqlite)
        }
    };

    // Two orders committed with their events; a third rolled back.
    for (total, commit) in [(12.5, true), (99.0, true), (1.0, false)] {
        let order_id = Uuid::now_v7();
        let event = order_created(order_id, total)?;
        match &store {
            AnyStore::Postgres(pg) => {
                let mut tx = pg.pool().begin().await?;
                sqlx::query("INSERT INTO orders VALUES ($1, $2)")
                    .bind(order_id)
                    .bind(total)
                    .execute(&mut *tx)
                    .await?;
                insert_outbox(&mut tx, &[event]).await?;
                if commit {
                    tx.commit().await?
                } else {
                    tx.rollback().await?
                }
            }
            AnyStore::Sqlite(sqlite) => {
                let mut tx = sqlite.pool().begin().await?;
                sqlx::query("INSERT INTO orders VALUES (?, ?)")
                    .bind(order_id.to_string())
                    .bind(total)
                    .execute(&mut *tx)
                    .await?;
                insert_outbox(&mut tx, &[event]).await?;
                if commit {
                    tx.commit().await?
                } else {
                    tx.rollback().await?
                }
            }
            _ => unreachable!("opened above as PostgreSQL or SQLite"),
        }
        println!(
            "order {order_id} ({total}): {}",
            if commit { "committed" } else { "rolled back" }
        );
    }

    // The relay: publish everything due, once, to a JSON lines file.
    let out = dir.join("events.jsonl");
    let sink = Arc::new(AnySink::from_url(
        &format!("file:{}", out.display()),
        &[],
        Duration::from_secs(10),
    )?);
    let publisher = publisher(
        store.outbox(),
        sink,
        ProcessorOptions::new(WorkerId::new("example-relay")?),
        Duration::from_secs(10),
    )
    .build();
    let options = RunOptions {
        mode: RunMode::Once,
        ..RunOptions::default()
    };
    let report = run(
        &publisher,
        &options,
        tokio::sync::watch::channel(false).1,
        &mut Sleep,
        |_| {},
    )
    .await?;
    println!("published {}", report.completed);
    let published = std::fs::read_to_string(&out)?;
    for line in published.lines() {
        let m: serde_json::Value = serde_json::from_str(line)?;
        println!(
            "  {} key={} total={}",
            m["topic"], m["key"], m["value"]["payload"]["total"]
        );
    }
    assert_eq!(
        published.lines().count(),
        2,
        "the rolled-back order has no event"
    );
    assert_eq!(store.outbox().counts().await?.completed, 2);
    if let (AnyStore::Postgres(pg), Some(schema)) = (&store, &pg_schema) {
        let drop = format!("DROP SCHEMA \"{schema}\" CASCADE");
        sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(pg.pool())
            .await?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
