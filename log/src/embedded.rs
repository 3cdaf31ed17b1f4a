//! The embedded backend: the usage log as append-only files on local disk.
//!
//! Layout under the data directory:
//!
//! ```text
//! <dir>/<topic>/partitions          number of partitions, as text
//! <dir>/<topic>/<p>.log             records of partition p, appended
//! <dir>/<topic>/groups/<group>      committed offsets: "<partition> <next offset>" lines
//! ```
//!
//! A record is framed as `len: u32 LE | crc32(body): u32 LE | body`, where
//! body is `timestamp_millis: i64 LE | key_len: u32 LE | key | payload`.
//! Appends are group-committed: whoever holds a partition's writer writes
//! every waiting record and syncs the file once for all of them, and each
//! append returns only after that sync. On open, a torn tail left by a crash
//! (a short or corrupt last frame, never acknowledged) is cut off.
//!
//! One process owns a data directory; within it each consumer group has at
//! most one member per topic, which reads every partition. Compaction is not
//! performed: readers of a compacted topic see every record, the last per key
//! winning.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::{LogError, Position, Record, TopicSpec, Watermarks, validate_group};

const HEADER_LEN: usize = 8;
const BODY_PREFIX_LEN: usize = 12;
/// Records a consumer reads from disk in one go.
const READ_BATCH: usize = 1024;

/// Where the embedded log keeps its files.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    pub dir: PathBuf,
}

/// The embedded log. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    topics: Mutex<HashMap<String, Arc<TopicFiles>>>,
    members: Arc<Mutex<HashSet<(String, String)>>>,
}

#[derive(Debug)]
struct TopicFiles {
    name: String,
    dir: PathBuf,
    partitions: Vec<Partition>,
    /// Bumped after every group commit, so consumers wake up.
    appended: watch::Sender<u64>,
}

type Waiter = oneshot::Sender<Result<i64, io::Error>>;

#[derive(Debug)]
struct Partition {
    path: PathBuf,
    /// Records waiting for the next group commit, with who waits for them.
    pending: Mutex<Vec<(Vec<u8>, Waiter)>>,
    writer: Mutex<File>,
    /// File position of each record, by offset. Only fully synced records.
    index: RwLock<Vec<u64>>,
    /// File length covered by `index`.
    synced_len: RwLock<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io { action, path, source }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl EmbeddedLog {
    /// Opens (and creates if needed) the log under `config.dir`.
    pub fn open(config: EmbeddedConfig) -> Result<EmbeddedLog, LogError> {
        fs::create_dir_all(&config.dir).map_err(io_err("create log directory", &config.dir))?;
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                dir: config.dir,
                topics: Mutex::new(HashMap::new()),
                members: Arc::new(Mutex::new(HashSet::new())),
            }),
        })
    }

    pub async fn ensure_topic(&self, topic: &str, spec: TopicSpec) -> Result<(), LogError> {
        let this = self.clone();
        let topic = topic.to_owned();
        blocking(move || this.topic(&topic, Some(spec)).map(|_| ())).await
    }

    pub async fn append(&self, topic: &str, key: &[u8], payload: Bytes) -> Result<Position, LogError> {
        let this = self.clone();
        let topic_name = topic.to_owned();
        let files = blocking(move || this.topic(&topic_name, None)).await?;
        let partition = partition_for(key, files.partitions.len());
        let frame = encode_frame(now_millis(), key, &payload);
        let (tx, rx) = oneshot::channel();
        lock(&files.partitions[partition].pending).push((frame, tx));
        let flusher = Arc::clone(&files);
        blocking(move || {
            flusher.flush(partition);
            Ok(())
        })
        .await?;
        let part = &files.partitions[partition];
        let offset = rx
            .await
            .map_err(|_| LogError::Closed)?
            .map_err(io_err("append to", &part.path))?;
        Ok(Position {
            partition: partition_id(partition),
            offset,
        })
    }

    pub async fn consumer(&self, topic: &str, group: &str) -> Result<EmbeddedConsumer, LogError> {
        validate_group(group)?;
        let files = self.existing_topic(topic).await?;
        let member = MemberGuard::join(&self.inner.members, topic, group)?;
        let offsets_path = files.dir.join("groups").join(group);
        let path = offsets_path.clone();
        let committed = blocking(move || read_offsets(&path)).await?;
        let next = (0..files.partitions.len())
            .map(|p| committed.get(&partition_id(p)).copied().unwrap_or(0))
            .collect();
        Ok(EmbeddedConsumer::new(
            files,
            next,
            Some(Group {
                committed,
                offsets_path,
                _member: member,
            }),
        ))
    }

    /// Reads every partition of `topic` from its beginning, outside any group.
    pub async fn reader(&self, topic: &str) -> Result<EmbeddedConsumer, LogError> {
        let files = self.existing_topic(topic).await?;
        let next = vec![0; files.partitions.len()];
        Ok(EmbeddedConsumer::new(files, next, None))
    }

    /// Each partition's records, `[0, count)`: only records that are
    /// synced (acknowledged) count.
    pub async fn watermarks(&self, topic: &str) -> Result<Vec<Watermarks>, LogError> {
        let files = self.existing_topic(topic).await?;
        Ok(files
            .partitions
            .iter()
            .enumerate()
            .map(|(p, part)| Watermarks {
                partition: partition_id(p),
                low: 0,
                high: part.index.read().unwrap_or_else(PoisonError::into_inner).len() as i64,
            })
            .collect())
    }

    async fn existing_topic(&self, topic: &str) -> Result<Arc<TopicFiles>, LogError> {
        let this = self.clone();
        let topic = topic.to_owned();
        blocking(move || this.topic(&topic, None)).await
    }

    /// The topic's files, opening them on first use. With `create`, a
    /// missing topic is created with that spec; without, it is an error.
    fn topic(&self, name: &str, create: Option<TopicSpec>) -> Result<Arc<TopicFiles>, LogError> {
        let mut topics = lock(&self.inner.topics);
        if let Some(files) = topics.get(name) {
            return Ok(Arc::clone(files));
        }
        let files = Arc::new(TopicFiles::open(&self.inner.dir, name, create)?);
        topics.insert(name.to_owned(), Arc::clone(&files));
        Ok(files)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, LogError> + Send + 'static) -> Result<T, LogError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| LogError::Closed)?
}

fn partition_for(key: &[u8], partitions: usize) -> usize {
    crc32fast::hash(key) as usize % partitions
}

fn partition_id(index: usize) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
}

fn encode_frame(timestamp_millis: i64, key: &[u8], payload: &[u8]) -> Vec<u8> {
    let body_len = BODY_PREFIX_LEN + key.len() + payload.len();
    let mut frame = Vec::with_capacity(HEADER_LEN + body_len);
    frame.extend_from_slice(&(body_len as u32).to_le_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(&timestamp_millis.to_le_bytes());
    frame.extend_from_slice(&(key.len() as u32).to_le_bytes());
    frame.extend_from_slice(key);
    frame.extend_from_slice(payload);
    let crc = crc32fast::hash(&frame[HEADER_LEN..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    frame
}

/// Splits a checked frame body into (timestamp, key, payload).
fn decode_body(body: &[u8]) -> Option<(i64, &[u8], &[u8])> {
    let timestamp = i64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let key_len = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?) as usize;
    let key = body.get(BODY_PREFIX_LEN..BODY_PREFIX_LEN.checked_add(key_len)?)?;
    let payload = body.get(BODY_PREFIX_LEN + key_len..)?;
    Some((timestamp, key, payload))
}

impl TopicFiles {
    fn open(root: &Path, name: &str, create: Option<TopicSpec>) -> Result<TopicFiles, LogError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(LogError::Io {
                action: "open topic",
                path: root.join(name),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a valid topic name"),
            });
        }
        let dir = root.join(name);
        let meta = dir.join("partitions");
        let count = match fs::read_to_string(&meta) {
            Ok(text) => text
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| LogError::Io {
                    action: "read partition count from",
                    path: meta.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidData, format!("{text:?} is not a positive number")),
                })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let Some(spec) = create else {
                    return Err(LogError::Io {
                        action: "open topic",
                        path: dir,
                        source: io::Error::new(io::ErrorKind::NotFound, "topic does not exist"),
                    });
                };
                let count = spec.partitions.max(1) as usize;
                fs::create_dir_all(dir.join("groups")).map_err(io_err("create topic directory", &dir))?;
                write_atomically(&meta, count.to_string().as_bytes())?;
                count
            }
            Err(e) => return Err(io_err("read", &meta)(e)),
        };
        fs::create_dir_all(dir.join("groups")).map_err(io_err("create topic directory", &dir))?;
        let partitions = (0..count)
            .map(|p| Partition::open(dir.join(format!("{p}.log"))))
            .collect::<Result<Vec<_>, _>>()?;
        let (appended, _) = watch::channel(0);
        Ok(TopicFiles {
            name: name.to_owned(),
            dir,
            partitions,
            appended,
        })
    }

    /// Writes every waiting record of `partition`, syncs once, and answers
    /// each waiter. A waiter whose record an earlier flush took is already
    /// answered, so an empty queue is fine.
    fn flush(&self, partition: usize) {
        let part = &self.partitions[partition];
        let mut file = lock(&part.writer);
        let batch = std::mem::take(&mut *lock(&part.pending));
        if batch.is_empty() {
            return;
        }
        let start = *part.synced_len.read().unwrap_or_else(PoisonError::into_inner);
        let mut buf = Vec::with_capacity(batch.iter().map(|(f, _)| f.len()).sum());
        let mut positions = Vec::with_capacity(batch.len());
        for (frame, _) in &batch {
            positions.push(start + buf.len() as u64);
            buf.extend_from_slice(frame);
        }
        let written = file.write_all(&buf).and_then(|()| file.sync_data());
        match written {
            Ok(()) => {
                let mut index = part.index.write().unwrap_or_else(PoisonError::into_inner);
                let first = index.len() as i64;
                index.extend_from_slice(&positions);
                *part.synced_len.write().unwrap_or_else(PoisonError::into_inner) = start + buf.len() as u64;
                drop(index);
                for (i, (_, waiter)) in batch.into_iter().enumerate() {
                    let _ = waiter.send(Ok(first + i as i64));
                }
                self.appended.send_modify(|v| *v += 1);
            }
            Err(e) => {
                // Cut off whatever part of the batch reached the file, so the
                // next append starts on a frame boundary.
                let _ = file.set_len(start);
                tracing::error!(topic = %self.name, partition, error = %e, "embedded log append failed");
                for (_, waiter) in batch {
                    let _ = waiter.send(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
    }

    /// Reads up to `max` records of `partition` from offset `from` on.
    fn read(&self, partition: usize, from: i64, max: usize) -> Result<Vec<Record>, LogError> {
        let part = &self.partitions[partition];
        let (positions, end) = {
            let index = part.index.read().unwrap_or_else(PoisonError::into_inner);
            let from_idx = usize::try_from(from).unwrap_or(0).min(index.len());
            let to_idx = from_idx.saturating_add(max).min(index.len());
            let end = index
                .get(to_idx)
                .copied()
                .unwrap_or(*part.synced_len.read().unwrap_or_else(PoisonError::into_inner));
            (index[from_idx..to_idx].to_vec(), end)
        };
        let Some(&first) = positions.first() else {
            return Ok(Vec::new());
        };
        let reader = File::open(&part.path).map_err(io_err("open", &part.path))?;
        let mut buf = vec![0; (end - first) as usize];
        reader
            .read_exact_at(&mut buf, first)
            .map_err(io_err("read", &part.path))?;
        let mut records = Vec::with_capacity(positions.len());
        for (i, pos) in positions.iter().enumerate() {
            let at = (pos - first) as usize + HEADER_LEN;
            let len = u32::from_le_bytes([buf[at - 8], buf[at - 7], buf[at - 6], buf[at - 5]]) as usize;
            let (timestamp_millis, key, payload) =
                buf.get(at..at + len)
                    .and_then(decode_body)
                    .ok_or_else(|| LogError::Io {
                        action: "decode record in",
                        path: part.path.clone(),
                        source: io::Error::new(io::ErrorKind::InvalidData, format!("bad frame at byte {pos}")),
                    })?;
            records.push(Record {
                partition: partition_id(partition),
                offset: from + i as i64,
                key: Bytes::copy_from_slice(key),
                payload: Bytes::copy_from_slice(payload),
                timestamp_millis,
            });
        }
        Ok(records)
    }
}

impl Partition {
    /// Opens a partition file, indexes its records and cuts off a torn tail.
    fn open(path: PathBuf) -> Result<Partition, LogError> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let (index, good_len) = scan(&mut file).map_err(io_err("scan", &path))?;
        let file_len = file.metadata().map_err(io_err("stat", &path))?.len();
        if good_len < file_len {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = file_len - good_len,
                "embedded log: cutting off a torn tail left by a crash (never acknowledged)"
            );
            file.set_len(good_len).map_err(io_err("truncate", &path))?;
            file.sync_data().map_err(io_err("sync", &path))?;
        }
        Ok(Partition {
            path,
            pending: Mutex::new(Vec::new()),
            writer: Mutex::new(file),
            index: RwLock::new(index),
            synced_len: RwLock::new(good_len),
        })
    }
}

/// Returns the position of each whole, intact frame and the length they cover.
fn scan(file: &mut File) -> io::Result<(Vec<u64>, u64)> {
    let mut reader = BufReader::with_capacity(1 << 20, &*file);
    let mut index = Vec::new();
    let mut pos = 0u64;
    let mut header = [0u8; HEADER_LEN];
    let mut body = Vec::new();
    loop {
        if !read_full(&mut reader, &mut header)? {
            break;
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        body.resize(len, 0);
        if len < BODY_PREFIX_LEN || !read_full(&mut reader, &mut body)? || crc32fast::hash(&body) != crc {
            break;
        }
        if decode_body(&body).is_none() {
            break;
        }
        index.push(pos);
        pos += (HEADER_LEN + len) as u64;
    }
    Ok((index, pos))
}

/// Fills `buf`; false if the file ended first.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), LogError> {
    let tmp = path.with_extension("tmp");
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(io_err("write", path))
}

fn read_offsets(path: &Path) -> Result<HashMap<i32, i64>, LogError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut parts = line.split_whitespace();
            let p = parts.next().and_then(|s| s.parse().ok());
            let o = parts.next().and_then(|s| s.parse().ok());
            p.zip(o).ok_or_else(|| LogError::Io {
                action: "parse committed offsets in",
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidData, format!("bad line {line:?}")),
            })
        })
        .collect()
}

/// Keeps a consumer group to one member per topic in this process.
#[derive(Debug)]
struct MemberGuard {
    members: Arc<Mutex<HashSet<(String, String)>>>,
    key: (String, String),
}

impl MemberGuard {
    fn join(
        members: &Arc<Mutex<HashSet<(String, String)>>>,
        topic: &str,
        group: &str,
    ) -> Result<MemberGuard, LogError> {
        let key = (topic.to_owned(), group.to_owned());
        if !lock(members).insert(key.clone()) {
            return Err(LogError::GroupBusy {
                topic: key.0,
                group: key.1,
            });
        }
        Ok(MemberGuard {
            members: Arc::clone(members),
            key,
        })
    }
}

impl Drop for MemberGuard {
    fn drop(&mut self) {
        lock(&self.members).remove(&self.key);
    }
}

/// The single member of a consumer group on an embedded topic, or a reader
/// of the whole topic outside any group.
#[derive(Debug)]
pub struct EmbeddedConsumer {
    files: Arc<TopicFiles>,
    /// Next offset to fetch from disk, per partition.
    next: Vec<i64>,
    buffer: VecDeque<Record>,
    changes: watch::Receiver<u64>,
    group: Option<Group>,
}

/// What a group member keeps beyond a reader.
#[derive(Debug)]
struct Group {
    committed: HashMap<i32, i64>,
    offsets_path: PathBuf,
    _member: MemberGuard,
}

impl EmbeddedConsumer {
    fn new(files: Arc<TopicFiles>, next: Vec<i64>, group: Option<Group>) -> EmbeddedConsumer {
        let changes = files.appended.subscribe();
        EmbeddedConsumer {
            files,
            next,
            buffer: VecDeque::new(),
            changes,
            group,
        }
    }

    pub async fn recv(&mut self) -> Result<Record, LogError> {
        loop {
            if let Some(record) = self.buffer.pop_front() {
                return Ok(record);
            }
            // Mark what we have seen before reading, so an append that lands
            // after the read still wakes us.
            self.changes.borrow_and_update();
            let files = Arc::clone(&self.files);
            let next = self.next.clone();
            let records = blocking(move || {
                let mut out = Vec::new();
                for (p, from) in next.iter().enumerate() {
                    out.extend(files.read(p, *from, READ_BATCH)?);
                }
                Ok(out)
            })
            .await?;
            if records.is_empty() {
                self.changes.changed().await.map_err(|_| LogError::Closed)?;
                continue;
            }
            for record in &records {
                self.next[record.partition as usize] = record.offset + 1;
            }
            self.buffer.extend(records);
        }
    }

    /// Every partition of the topic: an embedded member reads them all.
    pub fn partitions(&self) -> Vec<i32> {
        (0..self.next.len()).map(partition_id).collect()
    }

    pub fn seek(&mut self, partition: i32, offset: i64) -> Result<(), LogError> {
        let slot = usize::try_from(partition)
            .ok()
            .and_then(|p| self.next.get_mut(p))
            .ok_or_else(|| LogError::NoSuchPartition {
                topic: self.files.name.clone(),
                partition,
            })?;
        *slot = offset.max(0);
        self.buffer.retain(|r| r.partition != partition);
        Ok(())
    }

    pub async fn commit(&mut self, next_offsets: &[(i32, i64)]) -> Result<(), LogError> {
        let partitions = self.next.len();
        let topic = &self.files.name;
        let group = self.group.as_mut().ok_or_else(|| LogError::NoGroup(topic.clone()))?;
        for &(partition, offset) in next_offsets {
            if usize::try_from(partition).map_or(true, |p| p >= partitions) {
                return Err(LogError::NoSuchPartition {
                    topic: topic.clone(),
                    partition,
                });
            }
            group.committed.insert(partition, offset);
        }
        let mut lines: Vec<_> = group.committed.iter().map(|(p, o)| format!("{p} {o}\n")).collect();
        lines.sort();
        let path = group.offsets_path.clone();
        blocking(move || write_atomically(&path, lines.concat().as_bytes())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const TOPIC: &str = "t";
    const SPEC: TopicSpec = TopicSpec {
        partitions: 3,
        compacted: false,
    };

    async fn open(dir: &Path) -> EmbeddedLog {
        let log = EmbeddedLog::open(EmbeddedConfig { dir: dir.to_path_buf() }).expect("open");
        log.ensure_topic(TOPIC, SPEC).await.expect("topic");
        log
    }

    #[tokio::test]
    async fn appends_are_read_back_in_order_per_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path()).await;
        for i in 0..30u32 {
            let key = format!("k{}", i % 4);
            log.append(TOPIC, key.as_bytes(), Bytes::from(i.to_string()))
                .await
                .expect("append");
        }
        let mut consumer = log.consumer(TOPIC, "g").await.expect("consumer");
        let mut by_key: BTreeMap<Vec<u8>, Vec<u32>> = BTreeMap::new();
        for _ in 0..30 {
            let r = consumer.recv().await.expect("recv");
            let value = std::str::from_utf8(&r.payload).expect("utf8").parse().expect("number");
            by_key.entry(r.key.to_vec()).or_default().push(value);
        }
        for (key, values) in by_key {
            let k: u32 = std::str::from_utf8(&key[1..]).expect("utf8").parse().expect("number");
            let want: Vec<u32> = (0..30).filter(|i| i % 4 == k).collect();
            assert_eq!(values, want, "key {k}");
        }
    }

    #[tokio::test]
    async fn readers_see_the_whole_topic_whatever_groups_committed_and_cannot_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path()).await;
        for i in 0..6u32 {
            log.append(TOPIC, format!("k{i}").as_bytes(), Bytes::from(i.to_string()))
                .await
                .expect("append");
        }
        let mut member = log.consumer(TOPIC, "g").await.expect("consumer");
        let mut next = HashMap::new();
        for _ in 0..6 {
            let r = member.recv().await.expect("recv");
            next.insert(r.partition, r.offset + 1);
        }
        member
            .commit(&next.into_iter().collect::<Vec<_>>())
            .await
            .expect("commit");

        let mut readers = [
            log.reader(TOPIC).await.expect("reader"),
            log.reader(TOPIC).await.expect("second reader"),
        ];
        for reader in &mut readers {
            let mut seen = Vec::new();
            for _ in 0..6 {
                seen.push(reader.recv().await.expect("recv").payload);
            }
            seen.sort();
            assert_eq!(seen, (0..6).map(|i| Bytes::from(i.to_string())).collect::<Vec<_>>());
            assert!(matches!(reader.commit(&[(0, 1)]).await, Err(LogError::NoGroup(_))));
        }
        log.append(TOPIC, b"late", Bytes::from_static(b"7"))
            .await
            .expect("append");
        let followed = tokio::time::timeout(std::time::Duration::from_secs(5), readers[0].recv()).await;
        assert_eq!(
            followed.expect("a reader follows new records").expect("recv").payload,
            "7"
        );
    }

    #[tokio::test]
    async fn watermarks_count_records_per_partition_and_a_snapshot_stops_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = crate::Log::Embedded(open(dir.path()).await);
        let empty = log.watermarks(TOPIC).await.expect("watermarks");
        assert_eq!(empty.iter().map(|w| (w.low, w.high)).collect::<Vec<_>>(), [(0, 0); 3]);
        let mut appended = BTreeMap::new();
        for i in 0..10u32 {
            let at = log
                .append(TOPIC, format!("k{}", i % 2).as_bytes(), Bytes::from(i.to_string()))
                .await
                .expect("append");
            *appended.entry(at.partition).or_insert(0) += 1;
        }
        let marks = log.watermarks(TOPIC).await.expect("watermarks");
        assert_eq!(marks.iter().map(|w| w.partition).collect::<Vec<_>>(), [0, 1, 2]);
        for w in &marks {
            assert_eq!((w.low, w.high), (0, appended.get(&w.partition).copied().unwrap_or(0)));
        }

        let mut snapshot = log.snapshot(TOPIC).await.expect("snapshot");
        // Appended after the snapshot began: left out.
        log.append(TOPIC, b"k0", Bytes::from_static(b"after"))
            .await
            .expect("append");
        let mut seen = Vec::new();
        while let Some(record) = snapshot.next().await.expect("next") {
            seen.push(String::from_utf8(record.payload.to_vec()).expect("utf8"));
        }
        seen.sort();
        let mut want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        want.sort();
        assert_eq!(seen, want);
        assert!(snapshot.next().await.expect("done").is_none(), "stays done");

        // An empty topic is read at once.
        log.ensure_topic("empty", SPEC).await.expect("topic");
        let mut empty = log.snapshot("empty").await.expect("snapshot");
        assert!(empty.next().await.expect("next").is_none());
    }

    #[tokio::test]
    async fn a_snapshot_short_of_its_end_fails_after_the_stall_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = crate::Log::Embedded(open(dir.path()).await);
        log.append(TOPIC, b"k", Bytes::from_static(b"only"))
            .await
            .expect("append");
        let consumer = log.reader(TOPIC).await.expect("reader");
        let mut marks = log.watermarks(TOPIC).await.expect("watermarks");
        for w in &mut marks {
            if w.high > 0 {
                w.high += 1; // one record that never comes
            }
        }
        let mut snapshot =
            crate::Snapshot::new(TOPIC, consumer, marks).with_stall_timeout(std::time::Duration::from_millis(200));
        assert_eq!(
            &snapshot.next().await.expect("the one record").expect("some").payload[..],
            b"only"
        );
        let err = snapshot.next().await.expect_err("stalled");
        assert!(matches!(err, LogError::Stalled { reached: 1, end: 2, .. }), "{err}");
    }

    #[tokio::test]
    async fn a_group_resumes_from_its_commit_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = open(dir.path()).await;
            for i in 0..10u32 {
                log.append(TOPIC, b"same-key", Bytes::from(i.to_string()))
                    .await
                    .expect("append");
            }
            let mut c = log.consumer(TOPIC, "g").await.expect("consumer");
            let mut last = None;
            for _ in 0..4 {
                last = Some(c.recv().await.expect("recv"));
            }
            let last = last.expect("four records");
            c.commit(&[(last.partition, last.offset + 1)]).await.expect("commit");
        }
        let log = open(dir.path()).await;
        let mut c = log.consumer(TOPIC, "g").await.expect("consumer");
        let mut rest = Vec::new();
        for _ in 0..6 {
            rest.push(String::from_utf8(c.recv().await.expect("recv").payload.to_vec()).expect("utf8"));
        }
        assert_eq!(rest, ["4", "5", "6", "7", "8", "9"]);
        // Nothing more: the next recv waits until a new append.
        let waited = tokio::time::timeout(std::time::Duration::from_millis(100), c.recv()).await;
        assert!(waited.is_err(), "no record beyond the ten appended");
        // And another group starts from the beginning.
        let mut other = log.consumer(TOPIC, "h").await.expect("consumer");
        assert_eq!(&other.recv().await.expect("recv").payload[..], b"0");
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_on_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path()).await;
        let mut c = log.consumer(TOPIC, "g").await.expect("consumer");
        let reader = tokio::spawn(async move { c.recv().await.map(|r| r.payload) });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        log.append(TOPIC, b"k", Bytes::from_static(b"late"))
            .await
            .expect("append");
        let got = reader.await.expect("join").expect("recv");
        assert_eq!(&got[..], b"late");
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path()).await;
        let tasks: Vec<_> = (0..200u32)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(TOPIC, b"k", Bytes::from(i.to_string())).await })
            })
            .collect();
        let mut offsets = Vec::new();
        for t in tasks {
            offsets.push(t.await.expect("join").expect("append").offset);
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..200).collect::<Vec<i64>>());
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_appends_continue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path;
        {
            let log = open(dir.path()).await;
            let pos = log
                .append(TOPIC, b"k", Bytes::from_static(b"kept"))
                .await
                .expect("append");
            path = dir.path().join(TOPIC).join(format!("{}.log", pos.partition));
        }
        // A crash in the middle of the next write leaves half a frame.
        let frame = encode_frame(1, b"k", b"never acknowledged");
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&frame[..frame.len() / 2]).expect("write");
        drop(f);
        let log = open(dir.path()).await;
        let pos = log
            .append(TOPIC, b"k", Bytes::from_static(b"after"))
            .await
            .expect("append");
        assert_eq!(pos.offset, 1);
        let mut c = log.consumer(TOPIC, "g").await.expect("consumer");
        assert_eq!(&c.recv().await.expect("recv").payload[..], b"kept");
        assert_eq!(&c.recv().await.expect("recv").payload[..], b"after");
    }

    #[tokio::test]
    async fn seek_rewinds_one_partition() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path()).await;
        for i in 0..3u32 {
            log.append(TOPIC, b"k", Bytes::from(i.to_string()))
                .await
                .expect("append");
        }
        let mut c = log.consumer(TOPIC, "g").await.expect("consumer");
        let first = c.recv().await.expect("recv");
        c.recv().await.expect("recv");
        c.seek(first.partition, 0).expect("seek");
        assert_eq!(c.recv().await.expect("recv"), first);
        assert!(matches!(c.seek(99, 0), Err(LogError::NoSuchPartition { .. })));
    }

    #[tokio::test]
    async fn one_member_per_group_and_missing_topics_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path()).await;
        let first = log.consumer(TOPIC, "g").await.expect("consumer");
        assert!(matches!(
            log.consumer(TOPIC, "g").await,
            Err(LogError::GroupBusy { .. })
        ));
        drop(first);
        log.consumer(TOPIC, "g").await.expect("the group is free again");
        assert!(matches!(
            log.consumer(TOPIC, "bad/group").await,
            Err(LogError::InvalidGroup(_))
        ));
        assert!(log.append("missing", b"k", Bytes::new()).await.is_err());
    }
}
