//! Batched reads and writes of a hash map (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_UPDATE_BATCH`, kernel 5.6 and later), which aya 0.14 does not
//! offer. Carrying 100,000 conntrack entries over one at a time costs three
//! system calls each (next key, lookup, update): a third of a second here,
//! during which flows that start on the previous programs are not copied.
//! In batches of [`CHUNK`] it is a few dozen calls.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// Entries per call.
const CHUNK: usize = 4096;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Flag of an update that only adds.
const BPF_NOEXIST: u64 = 1;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs a batch command; the kernel writes the entries it handled into
/// `attr.count`, on success and on error.
fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is the batch member of bpf_attr, whose pointers the
    // callers set to live buffers holding `count` keys and values (and an
    // 8-byte batch token); the kernel reads and writes only those.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every entry of the hash map: its keys and its values, each packed
/// (`key_size` and `value_size` bytes apiece), in the same order. Entries
/// written or deleted meanwhile may or may not be seen.
pub fn read_all(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let mut chunk_keys = vec![0u8; CHUNK * key_size];
    let mut chunk_values = vec![0u8; CHUNK * value_size];
    // The hash maps' batch token is a bucket number (4 bytes).
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const token_in as u64 },
            out_batch: &raw mut token_out as u64,
            keys: chunk_keys.as_mut_ptr() as u64,
            values: chunk_values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(CHUNK);
        keys.extend_from_slice(&chunk_keys[..n * key_size]);
        values.extend_from_slice(&chunk_values[..n * value_size]);
        match result {
            Ok(()) => {}
            // The last buckets were read.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok((keys, values)),
            Err(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

/// The `BPF_MAP_UPDATE_ELEM` member of the kernel's `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

/// Adds one entry unless its key is present; whether it was added.
fn insert_if_absent(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: BPF_NOEXIST,
    };
    // SAFETY: the kernel reads one key and one value of the map's sizes
    // from the slices, which the caller cut to those sizes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            &raw mut attr,
            std::mem::size_of::<ElemAttr>() as u32,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        e => Err(e),
    }
}

/// Writes the packed entries over whatever the map holds under their keys,
/// in batches; returns how many were written.
pub fn overwrite(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    key_size: usize,
    value_size: usize,
) -> io::Result<usize> {
    let n = keys.len() / key_size;
    assert_eq!(values.len(), n * value_size, "as many values as keys");
    let mut at = 0;
    while at < n {
        let count = (n - at).min(CHUNK);
        let mut attr = BatchAttr {
            keys: keys[at * key_size..].as_ptr() as u64,
            values: values[at * value_size..].as_ptr() as u64,
            count: count as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        at += count;
    }
    Ok(n)
}

/// Writes the packed entries, whose keys the map did not hold when the
/// caller read it; returns how many were added. Up to [`CHUNK`] entries
/// go one by one with BPF_NOEXIST, so a key that programs wrote since is
/// kept. More go in batches, which the kernel takes with BPF_ANY only: a
/// key written by programs between the caller's read and the batch would
/// be overwritten. Large sets only arise before the programs that use the
/// map are attached (the first copy of an upgrade), when nothing writes.
pub fn insert_absent(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    key_size: usize,
    value_size: usize,
) -> io::Result<usize> {
    let n = keys.len() / key_size;
    assert_eq!(values.len(), n * value_size, "as many values as keys");
    if n <= CHUNK {
        let mut added = 0;
        for (k, v) in keys
            .chunks_exact(key_size)
            .zip(values.chunks_exact(value_size))
        {
            added += usize::from(insert_if_absent(map, k, v)?);
        }
        return Ok(added);
    }
    overwrite(map, keys, values, key_size, value_size)
}
