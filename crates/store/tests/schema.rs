//! Both migration folders describe the same schema: the same tables, columns (with the same
//! type class and nullability) and indexes, after migrating an empty database of each kind.

use sqlx::Row;
use std::collections::BTreeMap;

/// Table -> column -> (type class, nullable); and the index names.
#[derive(Debug, PartialEq, Eq)]
struct Schema {
    columns: BTreeMap<String, BTreeMap<String, (String, bool)>>,
    indexes: Vec<String>,
}

async fn sqlite_schema() -> Schema {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite:{}?mode=rwc", dir.path().join("s.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
    sqlx::migrate!("./migrations/sqlite")
        .run(&pool)
        .await
        .expect("sqlite migrations");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table'
           AND name NOT LIKE '\\_sqlx%' ESCAPE '\\' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
    )
    .fetch_all(&pool)
    .await
    .expect("tables");
    let mut columns = BTreeMap::new();
    for t in tables {
        let rows = sqlx::query("SELECT name, type, \"notnull\", pk FROM pragma_table_info($1)")
            .bind(&t)
            .fetch_all(&pool)
            .await
            .expect("columns");
        let cols = rows
            .iter()
            .map(|r| {
                let class = match r.get::<String, _>("type").as_str() {
                    "INTEGER" => "integer",
                    "TEXT" => "text",
                    "BLOB" => "bytes",
                    other => panic!("column {t}.{} has type {other}", r.get::<String, _>("name")),
                };
                // A primary key is never NULL (SQLite would let a TEXT one be).
                let nullable = r.get::<i64, _>("notnull") == 0 && r.get::<i64, _>("pk") == 0;
                (r.get::<String, _>("name"), (class.to_owned(), nullable))
            })
            .collect();
        columns.insert(t, cols);
    }
    let mut indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL",
    )
    .fetch_all(&pool)
    .await
    .expect("indexes");
    indexes.sort();
    Schema { columns, indexes }
}

async fn postgres_schema() -> Schema {
    let url = fleetrun_testkit::shared_postgres().create_database();
    let pool = sqlx::PgPool::connect(&url).await.expect("postgres");
    sqlx::migrate!("./migrations/postgres")
        .run(&pool)
        .await
        .expect("postgres migrations");
    let rows = sqlx::query(
        "SELECT table_name::text AS t, column_name::text AS c, data_type::text AS ty,
                is_nullable::text AS n, collation_name::text AS coll
         FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(&pool)
    .await
    .expect("columns");
    let mut columns: BTreeMap<String, BTreeMap<String, (String, bool)>> = BTreeMap::new();
    for r in &rows {
        let (t, c): (String, String) = (r.get("t"), r.get("c"));
        let class = match r.get::<String, _>("ty").as_str() {
            "bigint" => "integer",
            "text" => {
                // Ordered by bytes, as SQLite orders TEXT.
                let coll: Option<String> = r.get("coll");
                assert_eq!(coll.as_deref(), Some("C"), "{t}.{c} is not COLLATE \"C\"");
                "text"
            }
            "bytea" => "bytes",
            other => panic!("column {t}.{c} has type {other}"),
        };
        let nullable = r.get::<String, _>("n") == "YES";
        columns
            .entry(t)
            .or_default()
            .insert(c, (class.to_owned(), nullable));
    }
    // Named indexes (not the ones behind PRIMARY KEY and UNIQUE constraints).
    let mut indexes: Vec<String> = sqlx::query_scalar(
        "SELECT i.indexname::text FROM pg_indexes i
         WHERE i.schemaname = 'public' AND NOT EXISTS (
             SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
    )
    .fetch_all(&pool)
    .await
    .expect("indexes");
    indexes.sort();
    Schema { columns, indexes }
}

#[tokio::test]
async fn both_schemas_describe_the_same_tables() {
    let (sqlite, postgres) = (sqlite_schema().await, postgres_schema().await);
    assert!(sqlite.columns.len() >= 20, "{sqlite:?}");
    for (table, cols) in &sqlite.columns {
        assert_eq!(Some(cols), postgres.columns.get(table), "table {table}");
    }
    assert_eq!(
        sqlite.columns.keys().collect::<Vec<_>>(),
        postgres.columns.keys().collect::<Vec<_>>()
    );
    assert_eq!(sqlite.indexes, postgres.indexes);
}
