//! Many rows per statement: `INSERT … VALUES (…), (…), … ON CONFLICT …`.
//!
//! One statement per row costs a round trip each (to the Postgres server,
//! or to sqlx's SQLite worker thread); a ledger commit writes thousands of
//! rows. Rows go in statements of [`ROWS_PER_STATEMENT`], the rest in
//! power-of-two pieces, so each table has only a few distinct statements,
//! each prepared once per connection and then reused from sqlx's cache.

use sqlx::{AnyConnection, Executor};

/// Rows per statement: 512 rows of 8 columns stay far under both SQLite's
/// (32,766) and Postgres's (65,535) limits on bound parameters.
pub const ROWS_PER_STATEMENT: usize = 512;

/// One bound value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param<'a> {
    Text(&'a str),
    Int(i64),
    NullableInt(Option<i64>),
}

/// Row counts of the statements that write `rows` rows, largest first.
pub fn statement_sizes(mut rows: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if rows == 0 {
            return None;
        }
        let size = if rows >= ROWS_PER_STATEMENT {
            ROWS_PER_STATEMENT
        } else {
            1 << rows.ilog2()
        };
        rows -= size;
        Some(size)
    })
}

/// How a statement's parameters are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholders {
    /// `$1, $2, …`: Postgres.
    Numbered,
    /// `?, ?, …`: SQLite. Its numbered parameters are named ones, and
    /// binding N of them looks each name up in a list: N² work.
    Positional,
}

/// `($1, $2), ($3, $4)` (or `(?, ?), (?, ?)`) for `rows` rows of `columns` values.
fn values(rows: usize, columns: usize, placeholders: Placeholders) -> String {
    let mut sql = String::with_capacity(rows * columns * 6);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            match placeholders {
                Placeholders::Numbered => {
                    sql.push('$');
                    sql.push_str(&(row * columns + column + 1).to_string());
                }
                Placeholders::Positional => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql
}

/// Runs `{insert} VALUES … {on_conflict}` over `params`, which hold
/// `columns` values per row, row after row.
pub async fn upsert(
    conn: &mut AnyConnection,
    placeholders: Placeholders,
    insert: &str,
    on_conflict: &str,
    columns: usize,
    params: &[Param<'_>],
) -> Result<(), sqlx::Error> {
    debug_assert!(columns > 0 && params.len().is_multiple_of(columns));
    let mut rest = params;
    for rows in statement_sizes(params.len() / columns) {
        let (now, later) = rest.split_at(rows * columns);
        rest = later;
        let sql = format!("{insert} VALUES {} {on_conflict}", values(rows, columns, placeholders));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for param in now {
            query = match *param {
                Param::Text(text) => query.bind(text),
                Param::Int(int) => query.bind(int),
                Param::NullableInt(int) => query.bind(int),
            };
        }
        conn.execute(query).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_split_into_full_statements_then_powers_of_two() {
        assert_eq!(statement_sizes(0).count(), 0);
        assert_eq!(statement_sizes(1).collect::<Vec<_>>(), [1]);
        assert_eq!(statement_sizes(7).collect::<Vec<_>>(), [4, 2, 1]);
        assert_eq!(statement_sizes(512).collect::<Vec<_>>(), [512]);
        assert_eq!(statement_sizes(1300).collect::<Vec<_>>(), [512, 512, 256, 16, 4]);
        assert_eq!(statement_sizes(1300).sum::<usize>(), 1300);
    }

    #[test]
    fn values_number_every_parameter_once() {
        assert_eq!(values(1, 1, Placeholders::Numbered), "($1)");
        assert_eq!(values(2, 3, Placeholders::Numbered), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(values(2, 2, Placeholders::Positional), "(?, ?), (?, ?)");
    }
}
