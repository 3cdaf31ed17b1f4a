//! The on-disk spool: every batch is written here, and synced, before it is
//! sent; it leaves only when the collector has answered for it. After a crash
//! or restart the sidecar finds the batches still here and sends them again
//! with their original `(session, seq)`.
//!
//! One file per batch, `<session>-<seq>.batch`, holding `crc32 (LE) |
//! protobuf`. Files are written to a temporary name, synced and renamed, so a
//! crash leaves either the whole batch or nothing. The spool is bounded by
//! size; a batch that does not fit is not written (the caller keeps it in
//! memory and says so). A lock file keeps two sidecars out of one spool.

use std::fs::{self, File, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use tidemark_core::UsageBatch;

const EXTENSION: &str = "batch";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("spool {0} is in use by another sidecar")]
    Locked(PathBuf),
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    used: AtomicU64,
    _lock: File,
}

/// Whether a batch made it to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Durable,
    /// The spool is full: the batch lives in memory only.
    Full,
}

fn file_name(session: &str, seq: u64) -> String {
    format!("{session}-{seq:020}.{EXTENSION}")
}

impl Spool {
    /// Opens (creating) the spool and returns what a previous run left in it,
    /// oldest first. Unreadable files are set aside as `.corrupt`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Spool, Vec<UsageBatch>), SpoolError> {
        let err = |action| {
            let path = dir.to_path_buf();
            move |source| SpoolError::Io { path, action, source }
        };
        fs::create_dir_all(dir).map_err(err("create"))?;
        let lock = File::create(dir.join("LOCK")).map_err(err("create lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir.to_path_buf())),
            Err(TryLockError::Error(e)) => return Err(err("lock")(e)),
        }
        let mut found = Vec::new();
        let mut used = 0;
        for entry in fs::read_dir(dir).map_err(err("list"))? {
            let path = entry.map_err(err("list"))?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("tmp") => {
                    let _ = fs::remove_file(&path);
                }
                Some(EXTENSION) => match read_batch(&path) {
                    Ok(batch) => {
                        used += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                        found.push(batch);
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "unreadable spooled batch set aside; its usage is lost");
                        let _ = fs::rename(&path, path.with_extension("corrupt"));
                    }
                },
                _ => {}
            }
        }
        found.sort_by(|a, b| (&a.session_id, a.seq).cmp(&(&b.session_id, b.seq)));
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            used: AtomicU64::new(used),
            _lock: lock,
        };
        Ok((spool, found))
    }

    /// Writes `batch` durably, unless the spool is full.
    pub fn store(&self, batch: &UsageBatch) -> io::Result<Stored> {
        let payload = batch.encode_to_vec();
        let size = payload.len() as u64 + 4;
        if self.used.load(Ordering::Relaxed) + size > self.max_bytes {
            return Ok(Stored::Full);
        }
        let name = file_name(&batch.session_id, batch.seq);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut file = File::create(&tmp)?;
        file.write_all(&crc32fast::hash(&payload).to_le_bytes())?;
        file.write_all(&payload)?;
        file.sync_data()?;
        fs::rename(&tmp, self.dir.join(&name))?;
        File::open(&self.dir)?.sync_all()?;
        self.used.fetch_add(size, Ordering::Relaxed);
        Ok(Stored::Durable)
    }

    /// Forgets a batch the collector answered for.
    pub fn remove(&self, session: &str, seq: u64) -> io::Result<()> {
        let path = self.dir.join(file_name(session, seq));
        let size = match fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        fs::remove_file(&path)?;
        self.used
            .fetch_sub(size.min(self.used.load(Ordering::Relaxed)), Ordering::Relaxed);
        Ok(())
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

fn read_batch(path: &Path) -> io::Result<UsageBatch> {
    let bytes = fs::read(path)?;
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let (crc, payload) = bytes.split_at_checked(4).ok_or_else(|| invalid("too short"))?;
    let crc = u32::from_le_bytes(crc.try_into().map_err(|_| invalid("too short"))?);
    if crc32fast::hash(payload) != crc {
        return Err(invalid("checksum mismatch"));
    }
    UsageBatch::decode(payload).map_err(|e| invalid(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(session: &str, seq: u64) -> UsageBatch {
        UsageBatch {
            service: "shop".into(),
            session_id: session.into(),
            seq,
            ..UsageBatch::default()
        }
    }

    #[test]
    fn batches_survive_a_restart_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, found) = Spool::open(dir.path(), 1 << 20).unwrap();
            assert!(found.is_empty());
            for seq in [2, 0, 1] {
                assert_eq!(spool.store(&batch("s1", seq)).unwrap(), Stored::Durable);
            }
            spool.remove("s1", 1).unwrap();
            spool.remove("s1", 99).unwrap();
        }
        let (spool, found) = Spool::open(dir.path(), 1 << 20).unwrap();
        let seqs: Vec<u64> = found.iter().map(|b| b.seq).collect();
        assert_eq!(seqs, [0, 2]);
        assert!(spool.used_bytes() > 0);
    }

    #[test]
    fn a_full_spool_refuses_and_frees_space_on_remove() {
        let dir = tempfile::tempdir().unwrap();
        let one = batch("s1", 1).encode_to_vec().len() as u64 + 4;
        let (spool, _) = Spool::open(dir.path(), 2 * one).unwrap();
        assert_eq!(spool.store(&batch("s1", 1)).unwrap(), Stored::Durable);
        assert_eq!(spool.store(&batch("s1", 2)).unwrap(), Stored::Durable);
        assert_eq!(spool.store(&batch("s1", 3)).unwrap(), Stored::Full);
        spool.remove("s1", 1).unwrap();
        assert_eq!(spool.store(&batch("s1", 3)).unwrap(), Stored::Durable);
    }

    #[test]
    fn torn_and_corrupt_files_do_not_stop_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, _) = Spool::open(dir.path(), 1 << 20).unwrap();
            spool.store(&batch("s1", 0)).unwrap();
            spool.store(&batch("s1", 1)).unwrap();
        }
        fs::write(dir.path().join(file_name("s1", 1)), b"\x00\x01garbage").unwrap();
        fs::write(dir.path().join("half.batch.tmp"), b"half").unwrap();
        let (_, found) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(found.len(), 1);
        assert!(dir.path().join(format!("s1-{:020}.corrupt", 1)).exists());
        assert!(!dir.path().join("half.batch.tmp").exists());
    }

    #[test]
    fn one_spool_per_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(matches!(Spool::open(dir.path(), 1 << 20), Err(SpoolError::Locked(_))));
    }
}
