//! The upload phase's first half: find the outputs the Command asked for, hash them, and build
//! the `OutputFile` / `OutputDirectory` (with its `Tree`) / `OutputSymlink` entries plus the
//! list of blobs to upload. Blocking; [`super::exec`] does the uploading.
//!
//! Nothing outside the action's root is read: an output whose parent directory resolves (through
//! a symlink the action made) outside the root is refused, output directories are walked
//! without following symlinks, and every output symlink must be relative and point inside the
//! root (the client recreates it as-is, so an escaping one would escape on the client too).
//! Absolute targets are refused rather than passed on, although the server advertises
//! `symlink_absolute_path_strategy: ALLOWED` for the cache: DESIGN §8 keeps everything an action
//! produces inside its directory.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_proto::reapi::{
    command::OutputDirectoryFormat, Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile, OutputSymlink, SymlinkNode, Tree,
};
use prost::Message;

use super::remote::BlobSource;
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};

/// Nesting depth an output directory may have (the walk is recursive).
pub const MAX_OUTPUT_DEPTH: usize = 256;
/// Bytes read at a time while hashing a file.
const HASH_BUFFER_BYTES: usize = 64 << 10;

/// Which Command field an output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// `output_paths` (v2.1+): file, directory or symlink, whichever it turns out to be.
    Path,
    /// `output_files` (before v2.1): a file or a symlink to one.
    File,
    /// `output_directories` (before v2.1): a directory or a symlink to one.
    Directory,
}

/// One output to collect.
#[derive(Clone, Debug)]
pub struct OutputRequest {
    /// As the Command spells it, relative to the working directory; reported back as-is.
    pub path: String,
    /// Its components below the action root, `..` already resolved.
    pub rel: Vec<String>,
    pub kind: OutputKind,
}

/// A blob to upload: its digest and where its bytes are.
pub struct Upload {
    pub digest: BlobDigest,
    pub source: BlobSource,
}

/// The collected outputs, ready for the ActionResult once `uploads` are in the CAS.
#[derive(Default)]
pub struct Collected {
    pub files: Vec<OutputFile>,
    pub directories: Vec<OutputDirectory>,
    /// Symlinks asked for through `output_paths`.
    pub symlinks: Vec<OutputSymlink>,
    /// Symlinks asked for through `output_files`.
    pub file_symlinks: Vec<OutputSymlink>,
    /// Symlinks asked for through `output_directories`.
    pub directory_symlinks: Vec<OutputSymlink>,
    pub uploads: Vec<Upload>,
}

/// Hashes a file without reading it whole into memory.
pub fn hash_file(function: DigestFunction, path: &Path) -> Result<BlobDigest> {
    let mut f = std::fs::File::open(path).map_err(|e| KilnError::io(format!("open {}", path.display()), e))?;
    let mut h = function.hasher();
    let mut buf = vec![0u8; HASH_BUFFER_BYTES];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| KilnError::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(BlobDigest { function, hash: h.finalize(), size })
}

fn is_executable(m: &std::fs::Metadata) -> bool {
    m.permissions().mode() & 0o111 != 0
}

/// Checks an output symlink found at `at` (components of its directory below the root).
fn check_symlink(shown: &str, dir: &[String], target: &str) -> Result<()> {
    let refuse = |why: &str| KilnError::invalid(format!("output symlink {shown:?} -> {target:?}: the target {why}"));
    if target.is_empty() {
        return Err(refuse("is empty"));
    }
    if target.starts_with('/') {
        return Err(refuse("is absolute; only relative targets inside the action's directory are kept"));
    }
    let mut depth = dir.len();
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => depth = depth.checked_sub(1).ok_or_else(|| refuse("points outside the action's directory"))?,
            _ => depth += 1,
        }
    }
    Ok(())
}

fn read_target(path: &Path) -> Result<String> {
    let t = std::fs::read_link(path).map_err(|e| KilnError::io(format!("readlink {}", path.display()), e))?;
    t.into_os_string()
        .into_string()
        .map_err(|t| KilnError::invalid(format!("output symlink {} has a target that is not UTF-8: {t:?}", path.display())))
}

fn utf8_name(dir: &Path, name: std::ffi::OsString) -> Result<String> {
    name.into_string().map_err(|n| KilnError::invalid(format!("output entry {n:?} in {} has a name that is not UTF-8", dir.display())))
}

/// The Directory messages of one output directory, children finished before their parents.
struct TreeBuilder {
    function: DigestFunction,
    seen: HashSet<BlobDigest>,
    postorder: Vec<(BlobDigest, Directory, Vec<u8>)>,
}

impl TreeBuilder {
    /// Walks `path` (components `rel` below the root) without following symlinks, returning
    /// its Directory digest; files go into `uploads`.
    fn walk(&mut self, path: &Path, rel: &mut Vec<String>, depth: usize, uploads: &mut Vec<Upload>) -> Result<BlobDigest> {
        if depth > MAX_OUTPUT_DEPTH {
            return Err(KilnError::invalid(format!("output directory {} is nested over {MAX_OUTPUT_DEPTH} levels deep", path.display())));
        }
        let mut names = Vec::new();
        let listing = std::fs::read_dir(path).map_err(|e| KilnError::io(format!("list {}", path.display()), e))?;
        for item in listing {
            let item = item.map_err(|e| KilnError::io(format!("list {}", path.display()), e))?;
            names.push(utf8_name(path, item.file_name())?);
        }
        names.sort();
        let mut dir = Directory::default();
        for name in names {
            let p = path.join(&name);
            let m = std::fs::symlink_metadata(&p).map_err(|e| KilnError::io(format!("stat {}", p.display()), e))?;
            if m.is_symlink() {
                let target = read_target(&p)?;
                check_symlink(&p.display().to_string(), rel, &target)?;
                dir.symlinks.push(SymlinkNode { name, target, node_properties: None });
            } else if m.is_file() {
                let d = hash_file(self.function, &p)?;
                dir.files.push(FileNode { name, digest: Some(d.to_proto()), is_executable: is_executable(&m), node_properties: None });
                uploads.push(Upload { digest: d, source: BlobSource::File(p) });
            } else if m.is_dir() {
                rel.push(name.clone());
                let d = self.walk(&p, rel, depth + 1, uploads);
                rel.pop();
                dir.directories.push(DirectoryNode { name, digest: Some(d?.to_proto()) });
            } else {
                return Err(KilnError::invalid(format!(
                    "output {} is neither a file, a directory nor a symlink (a socket, FIFO or device cannot be uploaded)",
                    p.display()
                )));
            }
        }
        let bytes = dir.encode_to_vec();
        let d = self.function.digest_of(&bytes);
        if self.seen.insert(d) {
            self.postorder.push((d, dir, bytes));
        }
        Ok(d)
    }
}

/// Collects the outputs of an action whose root is `root`. `directory_format` is the
/// Command's `output_directory_format`: with `DIRECTORY_ONLY` or `TREE_AND_DIRECTORY` each
/// Directory is uploaded too and `root_directory_digest` set (a `Tree` is always produced:
/// REAPI lets a worker store a superset of the format asked for).
pub fn collect(root: &Path, requests: &[OutputRequest], directory_format: i32, function: DigestFunction) -> Result<Collected> {
    let root = std::fs::canonicalize(root).map_err(|e| KilnError::io(format!("resolve {}", root.display()), e))?;
    let with_directories = matches!(
        OutputDirectoryFormat::try_from(directory_format),
        Ok(OutputDirectoryFormat::DirectoryOnly) | Ok(OutputDirectoryFormat::TreeAndDirectory)
    );
    let mut out = Collected::default();
    for req in requests {
        let Some((path, parent_rel)) = locate(&root, req)? else { continue };
        let m = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(KilnError::io(format!("stat output {}", path.display()), e)),
        };
        if m.is_symlink() {
            let target = read_target(&path)?;
            check_symlink(&req.path, &parent_rel, &target)?;
            // A legacy field names the kind; the target must be of that kind when it exists.
            let pointee = std::fs::metadata(&path).ok();
            let link = OutputSymlink { path: req.path.clone(), target, node_properties: None };
            match req.kind {
                OutputKind::Path => out.symlinks.push(link),
                OutputKind::File => {
                    if pointee.is_some_and(|p| p.is_dir()) {
                        return Err(KilnError::FailedPrecondition(format!("output file {:?} is a symlink to a directory", req.path)));
                    }
                    out.file_symlinks.push(link);
                }
                OutputKind::Directory => {
                    if pointee.is_some_and(|p| !p.is_dir()) {
                        return Err(KilnError::FailedPrecondition(format!("output directory {:?} is a symlink to a file", req.path)));
                    }
                    out.directory_symlinks.push(link);
                }
            }
        } else if m.is_file() {
            if req.kind == OutputKind::Directory {
                return Err(KilnError::FailedPrecondition(format!("output directory {:?} is a regular file", req.path)));
            }
            let d = hash_file(function, &path)?;
            out.files.push(OutputFile {
                path: req.path.clone(),
                digest: Some(d.to_proto()),
                is_executable: is_executable(&m),
                contents: Vec::new(),
                node_properties: None,
            });
            out.uploads.push(Upload { digest: d, source: BlobSource::File(path) });
        } else if m.is_dir() {
            if req.kind == OutputKind::File {
                return Err(KilnError::FailedPrecondition(format!("output file {:?} is a directory", req.path)));
            }
            let mut b = TreeBuilder { function, seen: HashSet::new(), postorder: Vec::new() };
            let mut rel = parent_rel.clone();
            rel.extend(req.rel.last().cloned());
            let root_digest = b.walk(&path, &mut rel, 0, &mut out.uploads)?;
            // Reverse post-order is a topological order: each directory before its children,
            // each exactly once, the root first.
            let mut dirs = b.postorder;
            dirs.reverse();
            let mut it = dirs.into_iter();
            let (_, root_dir, root_bytes) = it.next().ok_or_else(|| KilnError::Internal("an empty tree walk".into()))?;
            let mut children = Vec::new();
            for (d, dir, bytes) in it {
                if with_directories {
                    out.uploads.push(Upload { digest: d, source: BlobSource::Bytes(bytes.into()) });
                }
                children.push(dir);
            }
            if with_directories {
                out.uploads.push(Upload { digest: root_digest, source: BlobSource::Bytes(root_bytes.into()) });
            }
            let tree = Tree { root: Some(root_dir), children }.encode_to_vec();
            let tree_digest = function.digest_of(&tree);
            out.uploads.push(Upload { digest: tree_digest, source: BlobSource::Bytes(tree.into()) });
            out.directories.push(OutputDirectory {
                path: req.path.clone(),
                tree_digest: Some(tree_digest.to_proto()),
                is_topologically_sorted: true,
                root_directory_digest: with_directories.then(|| root_digest.to_proto()),
            });
        } else {
            return Err(KilnError::invalid(format!(
                "output {:?} is neither a file, a directory nor a symlink (a socket, FIFO or device cannot be uploaded)",
                req.path
            )));
        }
    }
    Ok(out)
}

/// Where an output is on disk, and the components of its parent below the root. `None` when
/// its parent does not exist (the output was not produced). Refuses a parent that resolves
/// outside the root through a symlink.
fn locate(root: &Path, req: &OutputRequest) -> Result<Option<(PathBuf, Vec<String>)>> {
    let Some((last, parent)) = req.rel.split_last() else {
        return Ok(Some((root.to_path_buf(), Vec::new())));
    };
    let parent_path = parent.iter().fold(root.to_path_buf(), |p, c| p.join(c));
    let resolved = match std::fs::canonicalize(&parent_path) {
        Ok(p) => p,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => return Ok(None),
        Err(e) => return Err(KilnError::io(format!("resolve {}", parent_path.display()), e)),
    };
    let Ok(inside) = resolved.strip_prefix(root) else {
        return Err(KilnError::invalid(format!("output path {:?} leads outside the action's directory through a symlink", req.path)));
    };
    let parent_rel = inside.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    Ok(Some((resolved.join(last), parent_rel)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_symlink_targets_must_stay_inside() {
        let dir = vec!["a".to_string()];
        assert!(check_symlink("a/l", &dir, "../b").is_ok());
        assert!(check_symlink("a/l", &dir, "x/../../b").is_ok());
        assert!(check_symlink("a/l", &dir, "../../b").unwrap_err().to_string().contains("outside"));
        assert!(check_symlink("a/l", &dir, "/etc/passwd").unwrap_err().to_string().contains("absolute"));
    }

    #[test]
    fn trees_are_topologically_sorted_and_deduplicated() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        for d in ["out/a/x", "out/b/x", "out/c"] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        std::fs::write(out.join("a/x/f"), b"same").unwrap();
        std::fs::write(out.join("b/x/f"), b"same").unwrap();
        std::os::unix::fs::symlink("../a", out.join("c/l")).unwrap();
        let req = OutputRequest { path: "out".into(), rel: vec!["out".into()], kind: OutputKind::Path };
        let c = collect(tmp.path(), &[req], 0, DigestFunction::Sha256).unwrap();
        assert_eq!(c.directories.len(), 1);
        let tree_upload = c.uploads.last().unwrap();
        let BlobSource::Bytes(bytes) = &tree_upload.source else { panic!("the tree is in memory") };
        let tree = Tree::decode(&bytes[..]).unwrap();
        let root = tree.root.unwrap();
        assert_eq!(root.directories.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        // a and b are equal, so are a/x and b/x: children are {a(=b), x, c}.
        assert_eq!(tree.children.len(), 3);
        let pos = |d: &Directory| tree.children.iter().position(|c| c == d).unwrap();
        let a = tree.children.iter().find(|c| c.directories.len() == 1).unwrap();
        let x = tree.children.iter().find(|c| c.files.len() == 1).unwrap();
        assert!(pos(a) < pos(x));
    }
}
