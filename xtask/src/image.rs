//! Container images of the taskbus binaries, written as OCI image layouts without a container
//! engine.
//!
//! Each image is two or three gzip layers:
//! 1. a base: the C runtime the binaries link against (found with `ldd`), the host's CA
//!    bundle, `/etc/passwd` and `/etc/group` with the `nonroot` user (65532) the manifests run
//!    as, an `nsswitch.conf`, `/tmp` and the user's home;
//! 2. `tini` at `/usr/bin/tini` (only the GPU dispatcher's image: its local DaemonSet runs it
//!    as PID 1);
//! 3. the binary at `/usr/local/bin/<name>`, its debug information stripped, as the entrypoint.
//!
//! Nothing depends on the clock: file times are the commit's time (or `SOURCE_DATE_EPOCH`),
//! entries are sorted, and gzip headers carry no time, so the same binaries give the same
//! digests.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use ring::digest::{digest, Context as Sha256, SHA256};
use serde_json::{json, Value};

/// One image this repository builds.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Image name (the last part of the repository path) and the binary in it.
    pub name: &'static str,
    /// What the image runs, for its description label.
    pub description: &'static str,
    /// Ports the manifests declare (`containerPort`), as `PORT/tcp`.
    pub ports: &'static [&'static str],
    /// Whether the image carries tini at `/usr/bin/tini`.
    pub tini: bool,
}

/// Every image, named as the manifests in `deploy/` name them.
pub const IMAGES: &[Spec] = &[
    Spec {
        name: "taskbus",
        description: "taskbus command line: submit, tasks, pools, ledger, dlq, bench",
        ports: &[],
        tini: false,
    },
    Spec {
        name: "taskbus-coordinator",
        description: "taskbus coordinator: admits, routes, tracks, retries and dead-letters tasks",
        ports: &["9464/tcp"],
        tini: false,
    },
    Spec {
        name: "taskbus-agent",
        description: "taskbus demo agent (echo, sleep, fail, exec handlers)",
        ports: &["9467/tcp"],
        tini: false,
    },
    Spec {
        name: "taskbus-ledger",
        description: "taskbus payment ledger: holds, payouts and releases, double-entry",
        ports: &["9466/tcp"],
        tini: false,
    },
    Spec {
        name: "taskbus-scaler",
        description: "taskbus scaler: KEDA external scaler, external metrics API, direct scaling",
        ports: &["9090/tcp", "9465/tcp"],
        tini: false,
    },
    Spec {
        name: "taskbus-gpu-dispatcher",
        description: "taskbus GPU dispatcher: GPU tasks as Kubernetes Jobs or local processes",
        ports: &["9467/tcp"],
        tini: true,
    },
];

/// The user the images run as (distroless' `nonroot`), the one `deploy/` sets in
/// `runAsUser`/`runAsGroup`.
pub const NONROOT: u32 = 65532;
/// Where the binaries go; on the images' PATH.
pub const BIN_DIR: &str = "usr/local/bin";
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
const TINI_SOURCES: &[&str] = &["/usr/bin/tini-static", "/usr/bin/tini"];

const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image {0:?}; the images are: {1}")]
    UnknownImage(String, String),
    #[error("invalid tag {0:?}: a tag is 1-128 characters of letters, digits, `_`, `.` and `-`, not starting with `.` or `-`")]
    BadTag(String),
    #[error("invalid repository {0:?}: expected lowercase path components like `ghcr.io/you` or `registry.example.com:5000/team/taskbus` (letters, digits, and `.`, `_`, `-` inside components)")]
    BadRepository(String),
    #[error("{binary} not found in {dir}: build the binaries first (`cargo build --release --bins`) or point --bin-dir at them")]
    MissingBinary { binary: String, dir: String },
    #[error("{0} is not a directory this tool wrote (no `oci-layout` file) and is not empty: refusing to replace it; choose another --out")]
    ForeignDir(String),
    #[error("{what} failed: {detail}")]
    Tool { what: String, detail: String },
    #[error("{0} not found on this machine: install it (`apt-get install {1}`)")]
    MissingHostFile(String, &'static str),
    #[error("`ldd {binary}` names {lib}, which is not on this machine")]
    MissingLibrary { binary: String, lib: String },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

fn io_err(path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.as_ref().display().to_string();
    move |source| ImageError::Io { path, source }
}

/// Look up images by name; all of them when `names` is empty.
pub fn select(names: &[String]) -> Result<Vec<Spec>, ImageError> {
    if names.is_empty() {
        return Ok(IMAGES.to_vec());
    }
    names
        .iter()
        .map(|n| {
            IMAGES.iter().copied().find(|s| s.name == n).ok_or_else(|| {
                let all: Vec<_> = IMAGES.iter().map(|s| s.name).collect();
                ImageError::UnknownImage(n.clone(), all.join(", "))
            })
        })
        .collect()
}

/// Check a tag against the OCI distribution grammar `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), ImageError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !tag.starts_with(['.', '-']);
    ok.then_some(())
        .ok_or_else(|| ImageError::BadTag(tag.to_string()))
}

/// Check a repository prefix: an optional registry host (with an optional port) and lowercase
/// path components, e.g. `ghcr.io/taskbus` or `localhost:5000/team`.
pub fn validate_repository(repo: &str) -> Result<(), ImageError> {
    let bad = || ImageError::BadRepository(repo.to_string());
    if repo.is_empty() || repo.len() > 200 {
        return Err(bad());
    }
    let mut parts = repo.split('/').peekable();
    let first = parts.next().ok_or_else(bad)?;
    // The registry host may carry a port; the other components may not.
    let (host, port) = match first.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (first, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
    }
    std::iter::once(host)
        .chain(parts)
        .all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(&x))
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
        })
        .then_some(())
        .ok_or_else(bad)
}

/// What goes into a layer.
#[derive(Debug, Clone)]
enum Content {
    Dir,
    File(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Entry {
    mode: u32,
    uid: u32,
    content: Content,
}

/// The files of one layer by path (relative, no leading `/`), so that parents sort before
/// their children.
#[derive(Debug, Default, Clone)]
struct Tree(BTreeMap<String, Entry>);

impl Tree {
    fn dir(&mut self, path: &str, mode: u32, uid: u32) {
        self.parents(path);
        self.0.insert(
            path.to_string(),
            Entry {
                mode,
                uid,
                content: Content::Dir,
            },
        );
    }

    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.parents(path);
        self.0.insert(
            path.to_string(),
            Entry {
                mode,
                uid: 0,
                content: Content::File(data),
            },
        );
    }

    /// Every missing ancestor as a root-owned 0755 directory.
    fn parents(&mut self, path: &str) {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let p = &path[..at + i];
            self.0.entry(p.to_string()).or_insert(Entry {
                mode: 0o755,
                uid: 0,
                content: Content::Dir,
            });
            at += i + 1;
        }
    }
}

/// Shared libraries (and the dynamic loader) a binary needs, from `ldd`'s output.
pub fn parse_ldd(binary: &str, out: &str) -> Result<Vec<PathBuf>, ImageError> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        if line.contains("not a dynamic executable") || line.contains("statically linked") {
            return Ok(Vec::new());
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(ImageError::MissingLibrary {
                        binary: binary.to_string(),
                        lib: name.trim().to_string(),
                    });
                }
                rest.split(" (").next().unwrap_or("").trim()
            }
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        // linux-vdso.so.1 lives in the kernel and has no path.
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn ldd(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| ImageError::Tool {
            what: "running ldd (Debian's libc-bin)".into(),
            detail: e.to_string(),
        })?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // ldd exits 1 for a static binary; its message says so.
    if !out.status.success() && !text.contains("not a dynamic executable") {
        return Err(ImageError::Tool {
            what: format!("ldd {}", binary.display()),
            detail: text,
        });
    }
    parse_ldd(&binary.display().to_string(), &text)
}

/// The binary without its debug information (release builds keep line tables for profiles).
fn stripped(binary: &Path, strip: bool, scratch: &Path) -> Result<Vec<u8>, ImageError> {
    if !strip {
        return fs::read(binary).map_err(io_err(binary));
    }
    let out = scratch.join(binary.file_name().unwrap_or_default());
    let st = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(&out)
        .output()
        .map_err(|e| ImageError::Tool {
            what: "running objcopy (Debian's binutils; or pass --no-strip)".into(),
            detail: e.to_string(),
        })?;
    if !st.status.success() {
        return Err(ImageError::Tool {
            what: format!("objcopy --strip-debug {}", binary.display()),
            detail: String::from_utf8_lossy(&st.stderr).into_owned(),
        });
    }
    let data = fs::read(&out).map_err(io_err(&out))?;
    fs::remove_file(&out).map_err(io_err(&out))?;
    Ok(data)
}

fn host_file(path: &str, package: &'static str) -> Result<Vec<u8>, ImageError> {
    match fs::read(path) {
        Ok(d) => Ok(d),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(ImageError::MissingHostFile(path.to_string(), package))
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The base layer: C runtime, CA bundle, users, `/tmp` and the home directory.
fn base_tree(libs: &[PathBuf]) -> Result<Tree, ImageError> {
    let mut t = Tree::default();
    let n = NONROOT;
    t.file(
        "etc/passwd",
        0o644,
        format!("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{n}:{n}:nonroot:/home/nonroot:/sbin/nologin\n")
            .into_bytes(),
    );
    t.file(
        "etc/group",
        0o644,
        format!("root:x:0:\nnonroot:x:{n}:\n").into_bytes(),
    );
    // glibc's defaults without the file differ between versions; say it.
    t.file("etc/nsswitch.conf", 0o644, b"hosts: files dns\n".to_vec());
    t.file(
        CA_BUNDLE,
        0o644,
        host_file(&format!("/{CA_BUNDLE}"), "ca-certificates")?,
    );
    t.dir("tmp", 0o1777, 0);
    // 0755: an image built from these files by a Dockerfile COPY gets them owned by root, and
    // the user must still be able to enter its working directory.
    t.dir("home/nonroot", 0o755, n);
    t.dir("root", 0o700, 0);
    t.dir(BIN_DIR, 0o755, 0);
    for lib in libs {
        let data = fs::read(lib).map_err(io_err(lib))?;
        let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
        t.file(&rel, 0o755, data);
    }
    Ok(t)
}

/// sha256 and length of what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hash: Sha256::new(&SHA256),
            len: 0,
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A content-addressed blob: `sha256:<hex>` and its size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

struct Layer {
    blob: Blob,
    /// Digest of the uncompressed tar (the config's `diff_ids`).
    diff_id: String,
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn write_blob(layout: &Path, data: &[u8]) -> Result<Blob, ImageError> {
    let digest = format!("sha256:{}", hex::encode(digest(&SHA256, data)));
    let path = blob_path(layout, &digest);
    fs::write(&path, data).map_err(io_err(&path))?;
    Ok(Blob {
        digest,
        size: data.len() as u64,
    })
}

fn write_layer(layout: &Path, tree: &Tree, mtime: u64, level: u32) -> Result<Layer, ImageError> {
    let blobs = layout.join("blobs/sha256");
    let tmp = tempfile::NamedTempFile::new_in(&blobs).map_err(io_err(&blobs))?;
    let file = Hashing::new(BufWriter::new(tmp.as_file()));
    let gz = flate2::GzBuilder::new().write(file, flate2::Compression::new(level));
    let mut tar = tar::Builder::new(Hashing::new(gz));
    let err = io_err(tmp.path());
    let res: io::Result<(String, Blob)> = (|| {
        for (path, e) in &tree.0 {
            let mut h = tar::Header::new_ustar();
            h.set_mode(e.mode);
            h.set_uid(e.uid.into());
            h.set_gid(e.uid.into());
            h.set_mtime(mtime);
            match &e.content {
                Content::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{path}/"), io::empty())?;
                }
                Content::File(data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    tar.append_data(&mut h, path, data.as_slice())?;
                }
            }
        }
        let raw = tar.into_inner()?;
        let diff_id = format!("sha256:{}", hex::encode(raw.hash.finish()));
        let mut file = raw.inner.finish()?;
        file.flush()?;
        let blob = Blob {
            digest: format!("sha256:{}", hex::encode(file.hash.finish())),
            size: file.len,
        };
        Ok((diff_id, blob))
    })();
    let (diff_id, blob) = res.map_err(err)?;
    let dest = blob_path(layout, &blob.digest);
    tmp.persist(&dest).map_err(|e| io_err(&dest)(e.error))?;
    Ok(Layer { blob, diff_id })
}

/// How to build.
#[derive(Debug, Clone)]
pub struct Options {
    pub bin_dir: PathBuf,
    pub tag: String,
    pub repository: String,
    pub strip: bool,
    pub gzip_level: u32,
    /// Seconds since the epoch for file times and `created`.
    pub epoch: i64,
    /// The commit the binaries were built from, for the revision label.
    pub revision: Option<String>,
}

/// What was written for one image.
#[derive(Debug, Clone)]
pub struct Built {
    pub name: &'static str,
    pub manifest: Blob,
    pub reference: String,
}

/// Everything the selected images are made of, read once.
pub struct Parts {
    base: Tree,
    tini: Option<Vec<u8>>,
    binaries: BTreeMap<&'static str, Vec<u8>>,
}

/// Read the binaries (stripped), the libraries they need, the CA bundle and tini.
pub fn gather(specs: &[Spec], opts: &Options) -> Result<Parts, ImageError> {
    let scratch = tempfile::tempdir().map_err(io_err("temporary directory"))?;
    let mut libs = Vec::new();
    let mut binaries = BTreeMap::new();
    for s in specs {
        let path = opts.bin_dir.join(s.name);
        if !path.is_file() {
            return Err(ImageError::MissingBinary {
                binary: s.name.to_string(),
                dir: opts.bin_dir.display().to_string(),
            });
        }
        libs.extend(ldd(&path)?);
        binaries.insert(s.name, stripped(&path, opts.strip, scratch.path())?);
    }
    let tini = if specs.iter().any(|s| s.tini) {
        let src = TINI_SOURCES
            .iter()
            .find(|p| Path::new(p).is_file())
            .ok_or_else(|| ImageError::MissingHostFile("/usr/bin/tini-static".into(), "tini"))?;
        // The dynamic tini needs only libc, which the base has; the static one needs nothing.
        libs.extend(ldd(Path::new(src))?);
        Some(fs::read(src).map_err(io_err(src))?)
    } else {
        None
    };
    libs.sort();
    libs.dedup();
    Ok(Parts {
        base: base_tree(&libs)?,
        tini,
        binaries,
    })
}

/// Make `dir` an empty directory, replacing an earlier layout there but nothing else.
fn fresh_dir(dir: &Path) -> Result<(), ImageError> {
    if dir.exists() {
        if has_entries(dir)? && !dir.join("oci-layout").is_file() {
            return Err(ImageError::ForeignDir(dir.display().to_string()));
        }
        fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    fs::create_dir_all(dir.join("blobs/sha256")).map_err(io_err(dir))
}

/// Whether the directory `dir` holds anything.
fn has_entries(dir: &Path) -> Result<bool, ImageError> {
    Ok(fs::read_dir(dir).map_err(io_err(dir))?.next().is_some())
}

/// The layers of `spec`'s image, in order, each with what its history entry says.
fn layers(spec: &Spec, parts: &Parts) -> Vec<(&'static str, Tree)> {
    let mut trees = vec![(
        "base: C runtime, CA certificates, nonroot user",
        parts.base.clone(),
    )];
    if spec.tini {
        let mut t = Tree::default();
        t.file(
            "usr/bin/tini",
            0o755,
            parts.tini.clone().unwrap_or_default(),
        );
        trees.push(("tini at /usr/bin/tini", t));
    }
    let mut t = Tree::default();
    let binary = parts.binaries.get(spec.name).cloned().unwrap_or_default();
    t.file(&format!("{BIN_DIR}/{}", spec.name), 0o755, binary);
    trees.push(("the binary", t));
    trees
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Write `spec`'s image as an OCI image layout in `layout` (replacing an earlier one).
pub fn write_image(
    spec: &Spec,
    parts: &Parts,
    opts: &Options,
    layout: &Path,
) -> Result<Built, ImageError> {
    fresh_dir(layout)?;
    let mtime = opts.epoch.max(0) as u64;
    let created = chrono::DateTime::from_timestamp(opts.epoch, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let trees = layers(spec, parts);
    let mut layers = Vec::new();
    let mut history = Vec::new();
    for (what, tree) in &trees {
        layers.push(write_layer(layout, tree, mtime, opts.gzip_level)?);
        history
            .push(json!({"created": created, "created_by": format!("cargo xtask image: {what}")}));
    }
    let mut labels = json!({
        "org.opencontainers.image.title": spec.name,
        "org.opencontainers.image.description": spec.description,
        "org.opencontainers.image.version": opts.tag,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.created": created,
    });
    if let Some(rev) = &opts.revision {
        labels["org.opencontainers.image.revision"] = json!(rev);
    }
    let ports: serde_json::Map<String, Value> = spec
        .ports
        .iter()
        .map(|p| (p.to_string(), json!({})))
        .collect();
    let config = json!({
        "created": created,
        "architecture": arch(),
        "os": "linux",
        "config": {
            "User": format!("{NONROOT}:{NONROOT}"),
            "Env": [
                "PATH=/usr/local/bin:/usr/bin:/bin",
                format!("SSL_CERT_FILE=/{CA_BUNDLE}"),
            ],
            "Entrypoint": [format!("/{BIN_DIR}/{}", spec.name)],
            "WorkingDir": "/home/nonroot",
            "ExposedPorts": ports,
            "Labels": labels,
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": history,
    });
    let config = write_blob(layout, &serde_json::to_vec(&config).expect("json"))?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config.digest, "size": config.size},
        "layers": layers.iter().map(|l| json!({
            "mediaType": MT_LAYER, "digest": l.blob.digest, "size": l.blob.size,
        })).collect::<Vec<_>>(),
    });
    let manifest = write_blob(layout, &serde_json::to_vec(&manifest).expect("json"))?;
    let reference = format!("{}/{}:{}", opts.repository, spec.name, opts.tag);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": manifest.digest,
            "size": manifest.size,
            "platform": {"architecture": arch(), "os": "linux"},
            "annotations": {
                "org.opencontainers.image.ref.name": opts.tag,
                "io.containerd.image.name": reference,
            },
        }],
    });
    let write = |name: &str, v: &Value| {
        let p = layout.join(name);
        fs::write(&p, serde_json::to_vec(v).expect("json")).map_err(io_err(&p))
    };
    write("index.json", &index)?;
    write("oci-layout", &json!({"imageLayoutVersion": "1.0.0"}))?;
    Ok(Built {
        name: spec.name,
        manifest,
        reference,
    })
}

/// Write `spec`'s files as a directory tree under `root` (for `COPY --from` in a Dockerfile, or
/// a look inside), owners included when running as root.
pub fn write_rootfs(spec: &Spec, parts: &Parts, root: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    if root.exists() && has_entries(root)? {
        return Err(ImageError::ForeignDir(root.display().to_string()));
    }
    fs::create_dir_all(root).map_err(io_err(root))?;
    // The layers stacked as a runtime would unpack them: a later entry replaces an earlier one.
    let mut all = Tree::default();
    for (_, t) in layers(spec, parts) {
        all.0.extend(t.0);
    }
    let is_root = running_as_root();
    for (path, e) in &all.0 {
        let p = root.join(path);
        match &e.content {
            Content::Dir => fs::create_dir_all(&p).map_err(io_err(&p))?,
            Content::File(data) => fs::write(&p, data).map_err(io_err(&p))?,
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(e.mode)).map_err(io_err(&p))?;
        if is_root {
            std::os::unix::fs::chown(&p, Some(e.uid), Some(e.uid)).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// Whether this process runs as root (read from `/proc/self/status`).
fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_read() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc4a5f2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0b1c9d0000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0b1c600000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0b1ca1e000)\n";
        let libs = parse_ldd("x", out).unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("x", "\tnot a dynamic executable\n")
            .unwrap()
            .is_empty());
        assert!(parse_ldd("x", "\tstatically linked\n").unwrap().is_empty());
        let e = parse_ldd("bin", "\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(e.to_string().contains("libfoo.so.1"), "{e}");
    }

    #[test]
    fn tags_follow_the_distribution_grammar() {
        for ok in ["0.1.0", "latest", "v1_2-rc.3", "_x", &"a".repeat(128)] {
            validate_tag(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            ".x",
            "-x",
            "a:b",
            "a/b",
            "ü",
            "a b",
            &"a".repeat(129),
            "x\n",
        ] {
            assert!(validate_tag(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn repositories_are_checked() {
        for ok in [
            "ghcr.io/taskbus",
            "localhost:5000/team",
            "registry.example.com/a/b-c/d_e",
            "taskbus",
        ] {
            validate_repository(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "GHCR.io/x",
            "ghcr.io/",
            "/x",
            "a//b",
            "a/b:1",
            "host:port/x",
            "host:123456/x",
            "a/-b",
            "a/b-",
            "a b",
            "a/b\n",
        ] {
            assert!(validate_repository(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unknown_images_are_named_with_the_known_ones() {
        assert_eq!(select(&[]).unwrap().len(), IMAGES.len());
        let e = select(&["taskbus-coordinatr".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("taskbus-coordinatr") && e.contains("taskbus-ledger"),
            "{e}"
        );
    }

    #[test]
    fn trees_have_every_parent_before_its_children() {
        let mut t = Tree::default();
        t.file("usr/local/bin/x", 0o755, vec![1]);
        t.dir("home/nonroot", 0o700, NONROOT);
        let paths: Vec<_> = t.0.keys().cloned().collect();
        assert_eq!(
            paths,
            [
                "home",
                "home/nonroot",
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/x"
            ]
        );
        assert_eq!(t.0["home/nonroot"].uid, NONROOT);
        assert_eq!(t.0["usr"].mode, 0o755);
    }

    #[test]
    fn a_directory_of_other_files_is_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("precious"), "x").unwrap();
        let e = fresh_dir(d.path()).unwrap_err();
        assert!(matches!(e, ImageError::ForeignDir(_)), "{e}");
        assert!(d.path().join("precious").is_file());
        // An earlier layout is replaced.
        let l = d.path().join("layout");
        fs::create_dir_all(l.join("blobs")).unwrap();
        fs::write(l.join("oci-layout"), "{}").unwrap();
        fs::write(l.join("blobs/old"), "x").unwrap();
        fresh_dir(&l).unwrap();
        assert!(!l.join("blobs/old").exists() && l.join("blobs/sha256").is_dir());
    }
}
