//! What a database failure means for the caller: the server's error codes, classified into
//! [`StoreError`]'s kinds.

/// A database failure, classified by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The server or network failed; the same statement may succeed later (retry with backoff).
    #[error("database unavailable: {0}")]
    Transient(String),
    /// The server refused the statement for a reason that is not about a row: the schema (unknown
    /// table or column), privileges, a read-only server, a packet over `max_allowed_packet`. Retrying
    /// succeeds only once an operator fixes the database, so callers that retry must say so loudly
    /// (the save stage counts it by [`StoreError::class`] and reports how long it has been failing).
    #[error("database refused the statement: ERROR {code} ({state}): {message}")]
    Refused { code: u16, state: String, message: String },
    /// The statement itself is wrong for these rows; retrying will not help.
    #[error("database rejected the statement: {0}")]
    Permanent(String),
    /// The configured URL is unusable.
    #[error("bad database URL: {0}")]
    Url(String),
}

impl StoreError {
    /// The kind of failure as a metric label: `unavailable` (server or network; it may pass by
    /// itself), `statement` (the server refuses the statement until an operator fixes the database),
    /// `row` (the data of a row) or `config` (the URL).
    pub fn class(&self) -> &'static str {
        match self {
            StoreError::Transient(_) => "unavailable",
            StoreError::Refused { .. } => "statement",
            StoreError::Permanent(_) => "row",
            StoreError::Url(_) => "config",
        }
    }

    /// Whether the server rolled the transaction back to break a deadlock (ERROR 1213): redoing it
    /// at once is the cure InnoDB documents.
    pub fn is_deadlock(&self) -> bool {
        matches!(self, StoreError::Transient(m) if m.starts_with(&format!("ERROR {DEADLOCK} ")))
    }

    /// The server's error code, when the server answered with one.
    pub fn code(&self) -> Option<u16> {
        match self {
            StoreError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<mysql_async::Error> for StoreError {
    fn from(e: mysql_async::Error) -> Self {
        match &e {
            mysql_async::Error::Server(s) => classify_server_error(s.code, &s.state, &s.message),
            _ => StoreError::Transient(e.to_string()),
        }
    }
}

/// What an error answered by the server means for the caller (see [`StoreError`]).
fn classify_server_error(code: u16, state: &str, message: &str) -> StoreError {
    if is_row_error(code) {
        StoreError::Permanent(format!("ERROR {code} ({state}): {message}"))
    } else if is_server_state_error(code) {
        StoreError::Transient(format!("ERROR {code} ({state}): {message}"))
    } else {
        StoreError::Refused { code, state: state.to_owned(), message: message.to_owned() }
    }
}

/// Server error codes caused by the data of a row, not by the server's state.
fn is_row_error(code: u16) -> bool {
    matches!(
        code,
        1048 // column cannot be null
            | 1264 // out of range
            | 1292 // incorrect value
            | 1366 // incorrect string value
            | 1406 // data too long
            | 1452 // foreign key
            | 1644 // SIGNAL from a trigger
            | 3819 // check constraint (MySQL)
            | 4025 // check constraint (MariaDB)
    )
}

/// The server chose this transaction as a deadlock's victim and rolled it back.
const DEADLOCK: u16 = 1213;

/// Server error codes about the server's momentary state: the same statement may succeed on retry
/// without anyone changing the database. Every other server error that is not about a row is
/// [`StoreError::Refused`].
fn is_server_state_error(code: u16) -> bool {
    matches!(
        code,
        1040 // too many connections
            | 1041 // out of memory
            | 1053 // server shutdown in progress
            | 1158
            ..=1161 // network read/write errors and timeouts
            | 1205 // lock wait timeout
            | DEADLOCK
            | 1317 // query interrupted
            | 1615 // prepared statement needs to be re-prepared (the table changed under it)
            | 1927 // connection killed (MariaDB)
            | 1969 // max_statement_time exceeded (MariaDB)
            | 3024 // max_execution_time exceeded (MySQL)
            | 4031 // disconnected by the server for inactivity (MySQL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_statement_is_told_apart_from_an_unavailable_server_and_from_a_bad_row() {
        // Errors that wedge a shard until an operator acts: no such table / column, packet too large,
        // access denied, read-only server.
        for code in [1146, 1054, 1153, 1142, 1044, 1045, 1290, 1836] {
            let e = classify_server_error(code, "HY000", "refused");
            assert_eq!((e.class(), e.code()), ("statement", Some(code)), "{code}: {e}");
            assert!(e.to_string().contains(&format!("ERROR {code}")), "the code is in the message: {e}");
        }
        for code in [1040, 1053, 1205, 1213, 1927] {
            assert_eq!(classify_server_error(code, "HY000", "busy").class(), "unavailable", "{code}");
        }
        for code in [1048, 1406, 4025] {
            assert_eq!(classify_server_error(code, "22001", "bad row").class(), "row", "{code}");
        }
    }
}
