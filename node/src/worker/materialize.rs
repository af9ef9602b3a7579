//! The prepare phase: fetch the input tree, check it, and build the action directory from the
//! local content cache.
//!
//! The tree is fetched level by level with `BatchReadBlobs` rather than with `GetTree`: GetTree
//! returns re-encoded `Directory` messages, whose hash need not match the digests that name
//! them, and silently leaves out missing subtrees; reading each level by digest gives the
//! exact bytes to verify and names every missing directory.
//!
//! Checking happens on the whole tree before anything touches the disk ([`plan`]): every name
//! is one path component, no name appears twice in a directory, and every symlink target is
//! relative and resolves inside the input root, following the tree's own symlinks along the
//! way (so `up -> ..` in a subdirectory is fine but `esc -> sub/up/..` is not). The directory
//! is then built from the plan ([`materialize`]) without ever following a symlink: each entry
//! is created inside a directory this phase created itself.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kiln_proto::reapi::Directory;
use prost::Message;

use super::cache::{CacheKey, ContentCache, Pins};
use super::exec::{blocking, Counters};
use super::remote::{batches, run_bounded, RemoteCas, SendFuture, SMALL_BLOB_MAX_BYTES};
use super::ExecError;
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};

/// Distinct directories an input tree may have.
pub const MAX_INPUT_DIRECTORIES: usize = 1_000_000;
/// Files, directories and symlinks an action directory may hold once expanded (a tree that
/// reuses a subdirectory many times expands to far more entries than it has directories).
pub const MAX_INPUT_ENTRIES: usize = 4_000_000;
/// Symlinks followed while resolving one input symlink's target, as Linux's `ELOOP` limit.
const MAX_SYMLINK_HOPS: u32 = 40;

/// A fetched input tree: every directory, by digest.
pub struct InputTree {
    pub root: BlobDigest,
    pub dirs: HashMap<BlobDigest, Directory>,
}

/// Fetches the tree under `root` level by level, each level in as few batches as the budget
/// allows. Missing directories are reported together, level by level.
pub async fn fetch_tree(remote: &RemoteCas, function: DigestFunction, root: BlobDigest) -> Result<InputTree, ExecError> {
    let mut dirs: HashMap<BlobDigest, Directory> = HashMap::new();
    let mut level = vec![root];
    while !level.is_empty() {
        let blobs = remote.fetch_to_memory("input directories", &level).await?;
        let mut next = HashSet::new();
        for d in level {
            let bytes = blobs.get(&d).ok_or_else(|| KilnError::Internal(format!("directory {d} was fetched but is absent")))?;
            let dir = Directory::decode(&bytes[..]).map_err(|e| KilnError::invalid(format!("directory {d} does not decode: {e}")))?;
            for child in &dir.directories {
                let cd = BlobDigest::from_proto_opt(function, child.digest.as_ref())
                    .map_err(|e| KilnError::invalid(format!("directory {d}, subdirectory {:?}: {e}", child.name)))?;
                next.insert(cd);
            }
            dirs.insert(d, dir);
            if dirs.len() + next.len() > MAX_INPUT_DIRECTORIES {
                return Err(KilnError::invalid(format!("input tree {root} has over {MAX_INPUT_DIRECTORIES} directories")).into());
            }
        }
        level = next.into_iter().filter(|d| !dirs.contains_key(d)).collect();
        level.sort();
    }
    Ok(InputTree { root, dirs })
}

/// What to create in the action directory, paths relative to its root, parents first.
#[derive(Debug, Default)]
pub struct Plan {
    pub dirs: Vec<PathBuf>,
    pub files: Vec<(PathBuf, CacheKey)>,
    pub symlinks: Vec<(PathBuf, String)>,
}

impl Plan {
    /// The distinct non-empty cache keys the files need.
    pub fn keys(&self) -> Vec<CacheKey> {
        let mut keys: Vec<CacheKey> = self.files.iter().map(|(_, k)| *k).filter(|k| k.digest.size > 0).collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

/// Checks one name of a `Directory` entry: a single, real path component.
pub fn check_name(dir: &Path, name: &str) -> Result<()> {
    let bad = if name.is_empty() {
        Some("is empty")
    } else if name == "." || name == ".." {
        Some("is a relative path component")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains('\0') {
        Some("contains a NUL character")
    } else {
        None
    };
    match bad {
        Some(why) => Err(KilnError::invalid(format!("input name {name:?} in directory {:?} {why}", display_rel(dir)))),
        None => Ok(()),
    }
}

fn display_rel(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        ".".to_string()
    } else {
        p.display().to_string()
    }
}

/// One directory on the way from the root while resolving a symlink: its digest when it is a
/// directory of the input tree, `None` for a path the tree does not have (resolved lexically).
type Frame = Option<BlobDigest>;

enum Child<'a> {
    Dir(BlobDigest),
    Symlink(&'a str),
    Other,
}

fn child<'a>(tree: &'a InputTree, function: DigestFunction, dir: &BlobDigest, name: &str) -> Option<Child<'a>> {
    let d = tree.dirs.get(dir)?;
    if let Some(n) = d.directories.iter().find(|n| n.name == name) {
        return BlobDigest::from_proto_opt(function, n.digest.as_ref()).ok().map(Child::Dir);
    }
    if let Some(s) = d.symlinks.iter().find(|s| s.name == name) {
        return Some(Child::Symlink(&s.target));
    }
    d.files.iter().any(|f| f.name == name).then_some(Child::Other)
}

#[derive(Debug)]
enum Unresolvable {
    Escapes,
    Absolute,
    TooManyHops,
}

/// Resolves `target` from the directory `cur` the way the kernel would on the materialized
/// tree, following the tree's symlinks; fails if any step leaves the root.
fn resolve(
    tree: &InputTree,
    function: DigestFunction,
    mut cur: Vec<Frame>,
    target: &str,
    hops: &mut u32,
) -> std::result::Result<Vec<Frame>, Unresolvable> {
    if target.starts_with('/') {
        return Err(Unresolvable::Absolute);
    }
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if cur.pop().is_none() {
                    return Err(Unresolvable::Escapes);
                }
            }
            name => {
                let here = match cur.last() {
                    Some(f) => *f,
                    None => Some(tree.root),
                };
                match here.and_then(|d| child(tree, function, &d, name)) {
                    Some(Child::Dir(d)) => cur.push(Some(d)),
                    Some(Child::Symlink(t)) => {
                        *hops += 1;
                        if *hops > MAX_SYMLINK_HOPS {
                            return Err(Unresolvable::TooManyHops);
                        }
                        cur = resolve(tree, function, cur, t, hops)?;
                    }
                    Some(Child::Other) | None => cur.push(None),
                }
            }
        }
    }
    Ok(cur)
}

/// Checks the whole tree and lists what to create. Refuses (INVALID_ARGUMENT, naming the path)
/// bad names, duplicate names, bad digests, and symlinks that are absolute or resolve outside
/// the root.
pub fn plan(tree: &InputTree, function: DigestFunction) -> Result<Plan> {
    let mut plan = Plan::default();
    let mut entries = 0usize;
    // Depth-first with an explicit stack: a deep tree cannot overflow the thread's stack.
    let mut stack: Vec<(BlobDigest, PathBuf, Vec<Frame>)> = vec![(tree.root, PathBuf::new(), Vec::new())];
    while let Some((digest, path, frames)) = stack.pop() {
        let dir = tree.dirs.get(&digest).ok_or_else(|| KilnError::Internal(format!("directory {digest} was not fetched")))?;
        entries += dir.files.len() + dir.directories.len() + dir.symlinks.len();
        if entries > MAX_INPUT_ENTRIES {
            return Err(KilnError::invalid(format!("input tree {} expands to over {MAX_INPUT_ENTRIES} entries", tree.root)));
        }
        let mut names = HashSet::new();
        let all_names =
            dir.files.iter().map(|f| &f.name).chain(dir.directories.iter().map(|d| &d.name)).chain(dir.symlinks.iter().map(|s| &s.name));
        for name in all_names {
            check_name(&path, name)?;
            if !names.insert(name.as_str()) {
                return Err(KilnError::invalid(format!("input name {name:?} appears twice in directory {:?}", display_rel(&path))));
            }
        }
        for f in &dir.files {
            let d = BlobDigest::from_proto_opt(function, f.digest.as_ref())
                .map_err(|e| KilnError::invalid(format!("input file {:?}: {e}", path.join(&f.name).display())))?;
            plan.files.push((path.join(&f.name), CacheKey { digest: d, executable: f.is_executable }));
        }
        for s in &dir.symlinks {
            let at = path.join(&s.name);
            if s.target.is_empty() || s.target.contains('\0') {
                return Err(KilnError::invalid(format!("input symlink {:?} has an empty or NUL-bearing target", at.display())));
            }
            let mut hops = 0;
            match resolve(tree, function, frames.clone(), &s.target, &mut hops) {
                Ok(_) => {}
                Err(why) => {
                    let why = match why {
                        Unresolvable::Absolute => "is absolute",
                        Unresolvable::Escapes => "resolves outside the input root",
                        Unresolvable::TooManyHops => "goes through too many symlinks",
                    };
                    return Err(KilnError::invalid(format!("input symlink {:?} -> {:?}: the target {why}", at.display(), s.target)));
                }
            }
            plan.symlinks.push((at, s.target.clone()));
        }
        // Reversed so that the stack pops subdirectories in name order.
        for sub in dir.directories.iter().rev() {
            let d = BlobDigest::from_proto_opt(function, sub.digest.as_ref())
                .map_err(|e| KilnError::invalid(format!("input directory {:?}: {e}", path.join(&sub.name).display())))?;
            let mut f = frames.clone();
            f.push(Some(d));
            stack.push((d, path.join(&sub.name), f));
        }
        if !path.as_os_str().is_empty() {
            plan.dirs.push(path);
        }
    }
    Ok(plan)
}

/// Fetches the cache keys the plan needs that the cache lacks, and pins every key into `pins`.
/// Each content is downloaded once even when both its executable and plain copies are wanted:
/// the second copy is made locally. Missing blobs are reported together.
pub(crate) async fn fill_cache(
    remote: &RemoteCas,
    cache: &Arc<ContentCache>,
    keys: Vec<CacheKey>,
    pins: &mut Pins,
    counters: &Counters,
) -> Result<(), ExecError> {
    // Pin what is there: stats every file, so off the async threads.
    let c = cache.clone();
    let (present, absent): (Vec<CacheKey>, Vec<CacheKey>) = blocking(move || {
        let (p, a): (Vec<CacheKey>, Vec<CacheKey>) = keys.into_iter().partition(|k| c.pin_if_present(k));
        Ok((p, a))
    })
    .await?;
    let hit_bytes: u64 = present.iter().map(|k| k.digest.size).sum();
    let miss_bytes: u64 = absent.iter().map(|k| k.digest.size).sum();
    counters.cache_hits.fetch_add(present.len() as u64, Ordering::Relaxed);
    counters.cache_misses.fetch_add(absent.len() as u64, Ordering::Relaxed);
    metrics::counter!(super::CACHE_HITS).increment(present.len() as u64);
    metrics::counter!(super::CACHE_HIT_BYTES).increment(hit_bytes);
    metrics::counter!(super::CACHE_MISSES).increment(absent.len() as u64);
    metrics::counter!(super::CACHE_MISS_BYTES).increment(miss_bytes);
    for k in &present {
        pins.push(*k);
    }
    if absent.is_empty() {
        return Ok(());
    }

    // Keys whose twin is pinned are copies away; the others need their content downloaded,
    // once per digest.
    let pinned: HashSet<CacheKey> = present.iter().copied().collect();
    let (local, remote_keys): (Vec<CacheKey>, Vec<CacheKey>) = absent.into_iter().partition(|k| pinned.contains(&k.twin()));
    let mut by_digest: HashMap<BlobDigest, Vec<CacheKey>> = HashMap::new();
    for k in remote_keys {
        by_digest.entry(k.digest).or_default().push(k);
    }
    let (small, big): (Vec<BlobDigest>, Vec<BlobDigest>) = {
        let mut all: Vec<BlobDigest> = by_digest.keys().copied().collect();
        all.sort();
        all.into_iter().partition(|d| d.size <= SMALL_BLOB_MAX_BYTES)
    };

    let by_digest = Arc::new(by_digest);
    let mut missing = Vec::new();
    let mut inserted: Vec<CacheKey> = Vec::new();

    // Small blobs in batches, big ones streamed to temp files; each written and inserted on
    // the blocking pool as it arrives. The futures own what they use (see `run_bounded`).
    /// The keys one fetch inserted, and the digests the CAS lacked.
    type Fetched = Result<(Vec<CacheKey>, Vec<BlobDigest>), ExecError>;
    let mut fetches: Vec<SendFuture<Fetched>> = Vec::new();
    for b in batches(small) {
        let (remote, cache, by_digest) = (remote.clone(), cache.clone(), by_digest.clone());
        fetches.push(Box::pin(async move {
            let (found, miss) = remote.batch_read(b).await?;
            let keys = blocking(move || {
                let mut keys = Vec::new();
                for (d, data) in found {
                    let tmp = cache.tmp_path();
                    std::fs::write(&tmp, &data).map_err(|e| KilnError::io(format!("write {}", tmp.display()), e))?;
                    keys.extend(insert_all(&cache, by_digest.get(&d).map_or(&[][..], Vec::as_slice), &tmp)?);
                }
                Ok(keys)
            })
            .await?;
            Ok((keys, miss))
        }));
    }
    for d in big {
        let (remote, cache, by_digest) = (remote.clone(), cache.clone(), by_digest.clone());
        fetches.push(Box::pin(async move {
            let tmp = cache.tmp_path();
            match remote.read_to_file(&d, &tmp).await {
                Ok(true) => {
                    let keys = blocking(move || insert_all(&cache, by_digest.get(&d).map_or(&[][..], Vec::as_slice), &tmp)).await?;
                    Ok((keys, Vec::new()))
                }
                Ok(false) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    Ok((Vec::new(), vec![d]))
                }
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    Err(e)
                }
            }
        }));
    }
    let mut first_error = None;
    for r in run_bounded(fetches).await {
        match r {
            Ok((keys, miss)) => {
                inserted.extend(keys);
                missing.extend(miss);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }

    // Pins first, so that an error below still unpins what was inserted.
    let fetched: Vec<BlobDigest> =
        inserted.iter().filter(|k| by_digest.get(&k.digest).and_then(|v| v.first()) == Some(*k)).map(|k| k.digest).collect();
    counters.blobs_fetched.fetch_add(fetched.len() as u64, Ordering::Relaxed);
    let fetched_bytes: u64 = fetched.iter().map(|d| d.size).sum();
    counters.bytes_fetched.fetch_add(fetched_bytes, Ordering::Relaxed);
    metrics::counter!(super::BYTES_FETCHED).increment(fetched_bytes);
    for k in inserted {
        pins.push(k);
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if !missing.is_empty() {
        return Err(ExecError::missing("input files", missing));
    }

    // The twins of pinned keys, by local copy.
    let c = cache.clone();
    let made = blocking(move || {
        let mut made = Vec::new();
        for k in local {
            let tmp = c.tmp_path();
            std::fs::copy(c.path(&k.twin()), &tmp).map_err(|e| KilnError::io(format!("copy {}", c.path(&k.twin()).display()), e))?;
            c.insert_pinned(&k, &tmp)?;
            made.push(k);
        }
        Ok(made)
    })
    .await?;
    for k in made {
        pins.push(k);
    }
    Ok(())
}

/// Inserts the verified temp file `tmp` as the first of `keys`, and copies of it as the
/// others (the other mode). Returns the keys inserted (all pinned).
fn insert_all(cache: &ContentCache, keys: &[CacheKey], tmp: &Path) -> Result<Vec<CacheKey>> {
    let mut done = Vec::new();
    let Some((first, rest)) = keys.split_first() else {
        let _ = std::fs::remove_file(tmp);
        return Ok(done);
    };
    for k in rest {
        let copy = cache.tmp_path();
        std::fs::copy(tmp, &copy).map_err(|e| KilnError::io(format!("copy {}", tmp.display()), e))?;
        cache.insert_pinned(k, &copy)?;
        done.push(*k);
    }
    cache.insert_pinned(first, tmp)?;
    done.push(*first);
    Ok(done)
}

/// Builds the action directory `root` (which must not exist) from the plan, hardlinking files
/// out of the cache, where every key with content is pinned. Blocking.
/// Creates directory `p` unless it is there already (a reused action directory, emptied).
pub(crate) fn reuse_or_create_dir(p: &Path) -> Result<()> {
    match std::fs::create_dir(p) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(KilnError::io(format!("create {}", p.display()), e)),
        _ => Ok(()),
    }
}

/// `root` is created, or is there already and empty (a reused action directory).
pub fn materialize(root: &Path, plan: &Plan, cache: &ContentCache) -> Result<()> {
    reuse_or_create_dir(root)?;
    for d in &plan.dirs {
        let p = root.join(d);
        std::fs::create_dir(&p).map_err(|e| KilnError::io(format!("create input directory {}", p.display()), e))?;
    }
    for (rel, key) in &plan.files {
        let p = root.join(rel);
        if key.digest.size == 0 {
            std::fs::File::create(&p).map_err(|e| KilnError::io(format!("create input file {}", p.display()), e))?;
            set_mode(&p, key.mode())?;
            continue;
        }
        let src = cache.path(key);
        if let Err(e) = std::fs::hard_link(&src, &p) {
            // Too many links to one inode (EMLINK) or another file system: a copy will do.
            tracing::debug!(path = %p.display(), error = %e, "hardlink failed; copying");
            std::fs::copy(&src, &p).map_err(|e| KilnError::io(format!("copy {} to {}", src.display(), p.display()), e))?;
            set_mode(&p, key.mode())?;
        }
    }
    for (rel, target) in &plan.symlinks {
        let p = root.join(rel);
        std::os::unix::fs::symlink(target, &p).map_err(|e| KilnError::io(format!("create input symlink {}", p.display()), e))?;
    }
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(|e| KilnError::io(format!("chmod {}", p.display()), e))
}

/// Resolves a relative path of the Command (`working_directory`, an output path) from `base`
/// (components below the root) without touching the disk. Refuses absolute paths, empty
/// components (a `//` or a trailing `/`), NUL characters, and any `..` that would leave the
/// root. An empty path is `base` itself, allowed only where `allow_empty` says so.
pub fn resolve_command_path(field: &str, path: &str, base: &[String], allow_empty: bool) -> Result<Vec<String>> {
    let refuse = |why: &str| KilnError::invalid(format!("{field} {path:?} {why}"));
    if path.is_empty() {
        return if allow_empty { Ok(base.to_vec()) } else { Err(refuse("is empty")) };
    }
    if path.starts_with('/') {
        return Err(refuse("is absolute; it must be relative to the action's directory"));
    }
    if path.contains('\0') {
        return Err(refuse("contains a NUL character"));
    }
    let mut out = base.to_vec();
    for comp in path.split('/') {
        match comp {
            "" => return Err(refuse("has an empty path component")),
            "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(refuse("escapes the action's directory"));
                }
            }
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{DirectoryNode, FileNode, SymlinkNode};

    const F: DigestFunction = DigestFunction::Sha256;

    fn tree(dirs: Vec<Directory>) -> InputTree {
        // The first directory is the root.
        let digests: Vec<BlobDigest> = dirs.iter().map(|d| F.digest_of(&d.encode_to_vec())).collect();
        InputTree { root: digests[0], dirs: digests.into_iter().zip(dirs).collect() }
    }

    fn sym(name: &str, target: &str) -> SymlinkNode {
        SymlinkNode { name: name.into(), target: target.into(), node_properties: None }
    }

    fn sub(name: &str, d: &Directory) -> DirectoryNode {
        DirectoryNode { name: name.into(), digest: Some(F.digest_of(&d.encode_to_vec()).to_proto()) }
    }

    #[test]
    fn symlinks_resolve_through_the_tree_and_must_stay_inside() {
        let inner = Directory { symlinks: vec![sym("up", "..")], ..Default::default() };
        let ok = Directory { directories: vec![sub("sub", &inner)], symlinks: vec![sym("a", "sub/up/sub")], ..Default::default() };
        assert!(plan(&tree(vec![ok, inner.clone()]), F).is_ok());
        for (target, why) in [("sub/up/..", "outside"), ("/etc", "absolute"), ("../x", "outside"), ("sub/../..", "outside")] {
            let bad = Directory { directories: vec![sub("sub", &inner)], symlinks: vec![sym("esc", target)], ..Default::default() };
            let e = plan(&tree(vec![bad, inner.clone()]), F).unwrap_err().to_string();
            assert!(e.contains("\"esc\"") && e.contains(why), "{target}: {e}");
        }
        let looped = Directory { symlinks: vec![sym("a", "b"), sym("b", "a")], ..Default::default() };
        assert!(plan(&tree(vec![looped]), F).unwrap_err().to_string().contains("too many"));
    }

    #[test]
    fn bad_and_duplicate_names_are_refused_by_name() {
        for name in ["..", ".", "", "a/b"] {
            let f = FileNode { name: name.into(), digest: Some(F.empty().to_proto()), is_executable: false, node_properties: None };
            let d = Directory { files: vec![f], ..Default::default() };
            let e = plan(&tree(vec![d]), F).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.to_string().contains(&format!("{name:?}")), "{e}");
        }
        let f = FileNode { name: "x".into(), digest: Some(F.empty().to_proto()), is_executable: false, node_properties: None };
        let d = Directory { files: vec![f], symlinks: vec![sym("x", "y")], ..Default::default() };
        assert!(plan(&tree(vec![d]), F).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn command_paths_stay_inside_the_root() {
        let base = vec!["w".to_string()];
        assert_eq!(resolve_command_path("p", "../x", &base, false).unwrap(), vec!["x"]);
        assert!(resolve_command_path("p", "../x", &[], false).unwrap_err().to_string().contains("\"../x\""));
        assert!(resolve_command_path("p", "/x", &[], false).is_err());
        assert!(resolve_command_path("p", "a//b", &[], false).is_err());
        assert!(resolve_command_path("p", "a/", &[], false).is_err());
        assert!(resolve_command_path("p", "", &[], false).is_err());
        assert_eq!(resolve_command_path("p", "", &base, true).unwrap(), base);
    }
}
