//! The container images `cargo xtask image` writes (docs/DEPLOY.md, "Container images"):
//!
//! - each is an OCI image layout whose every blob matches its digest and size, whose config
//!   lists the digests of its uncompressed layers, and which skopeo (a registry tool that
//!   shares no code with ours) reads and copies;
//! - every image `deploy/` names is built, with the ports its pods declare and the commands
//!   they run (tini in the GPU dispatcher's);
//! - the same binaries give the same digests;
//! - unpacked, each image's files run its binary as user 65532 in a chroot, and the
//!   coordinator and an agent from their images carry a task to `succeeded` on a real
//!   nats-server and PostgreSQL without writing a file;
//! - the Dockerfile's targets match those images, and buildah builds two of them (with the
//!   compile stage replaced by xtask's files) into images that run as user 65532 from their
//!   working directory;
//! - bad arguments are refused with a sentence, before anything is written.
//!
//! Needs `skopeo`, `buildah` and `tini` (Debian packages, which scripts/test.sh installs) and,
//! for the chroot and buildah, root; without root those runs are skipped with a message.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value as Json};
use serde_yaml::Value as Yaml;
use taskbus_runtime::devservers::free_port;
use taskbus_tests::stack::Stack;
use taskbus_tests::{http_get, workspace_bin};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const IMAGES: [&str; 6] = [
    "taskbus",
    "taskbus-agent",
    "taskbus-coordinator",
    "taskbus-gpu-dispatcher",
    "taskbus-ledger",
    "taskbus-scaler",
];
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn xtask(args: &[&str]) -> std::process::Output {
    let bins = workspace_bin("xtask").parent().unwrap().to_path_buf();
    let mut c = Command::new(workspace_bin("xtask"));
    c.arg("image");
    if !args.contains(&"--bin-dir") {
        c.arg("--bin-dir").arg(bins);
    }
    c.args(args)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .expect("run xtask")
}

/// Build the images (debug binaries, fast gzip) into `out`.
fn build(out: &Path, only: &[&str]) {
    let mut args = vec!["--out", out.to_str().unwrap(), "--gzip-level", "1"];
    for o in only {
        args.extend(["--only", o]);
    }
    let o = xtask(&args);
    assert!(
        o.status.success(),
        "xtask image failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// sha256 of a file, or of its gunzipped content, with the system's tools.
fn sha256(path: &Path, gunzip: bool) -> String {
    let p = path.display();
    let script = if gunzip {
        format!("gzip -dc '{p}' | sha256sum")
    } else {
        format!("sha256sum < '{p}'")
    };
    let out = run(Command::new("sh").args(["-c", &script]));
    format!("sha256:{}", out.split_whitespace().next().unwrap())
}

fn read_json(path: &Path) -> Json {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Image {
    manifest_digest: String,
    index: Json,
    config: Json,
    layers: Vec<PathBuf>,
}

/// Read and check one layout: every descriptor's blob exists with that size and digest, the
/// media types are OCI's, the config's diff_ids are the uncompressed layers' digests, and no
/// blob is left over.
fn verify_layout(dir: &Path) -> Image {
    let mut used = BTreeSet::new();
    let mut blob = |d: &Json, media: &str| -> PathBuf {
        assert_eq!(d["mediaType"], media, "{}: {d}", dir.display());
        let digest = d["digest"].as_str().unwrap();
        let path = dir
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap());
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        assert_eq!(
            Some(len),
            d["size"].as_u64(),
            "{}: size of {digest}",
            dir.display()
        );
        assert_eq!(sha256(&path, false), digest, "{}", dir.display());
        used.insert(path.clone());
        path
    };
    assert_eq!(
        read_json(&dir.join("oci-layout")),
        json!({"imageLayoutVersion": "1.0.0"})
    );
    let index = read_json(&dir.join("index.json"));
    assert_eq!(index["schemaVersion"], 2);
    // Optional in the image spec: buildah leaves it out, we write it (checked by the caller).
    assert!(
        index["mediaType"].is_null()
            || index["mediaType"] == "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    let descs = index["manifests"].as_array().unwrap();
    assert_eq!(descs.len(), 1, "{index}");
    let manifest = read_json(&blob(
        &descs[0],
        "application/vnd.oci.image.manifest.v1+json",
    ));
    assert_eq!(manifest["schemaVersion"], 2);
    let config = read_json(&blob(
        &manifest["config"],
        "application/vnd.oci.image.config.v1+json",
    ));
    // Ours are gzip; buildah's may be plain tar.
    let mut diff_ids = Vec::new();
    let mut layers = Vec::new();
    for l in manifest["layers"].as_array().unwrap() {
        let gz = l["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip";
        let media = if gz {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        let path = blob(l, media);
        diff_ids.push(sha256(&path, gz));
        layers.push(path);
    }
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(
        config["rootfs"]["diff_ids"],
        json!(diff_ids),
        "{}",
        dir.display()
    );
    // One history entry per layer, besides the ones marked as making none.
    let made_layers = config["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["empty_layer"] != true)
        .count();
    assert_eq!(made_layers, layers.len(), "{}", dir.display());
    let all: BTreeSet<PathBuf> = std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(all, used, "{}: blobs nothing refers to", dir.display());
    Image {
        manifest_digest: descs[0]["digest"].as_str().unwrap().to_string(),
        index,
        config,
        layers,
    }
}

fn deploy_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run through cargo"))
        .join("../deploy")
}

/// Every container of every workload under `deploy/` whose image is one of ours:
/// (file, image name, container).
fn deploy_containers() -> Vec<(String, String, Yaml)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "yaml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&deploy_dir(), &mut files);
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let Ok(doc) = <Yaml as serde::Deserialize>::deserialize(doc) else {
                continue;
            };
            let spec = &doc["spec"]["template"]["spec"];
            let spec = if spec.is_mapping() {
                spec
            } else {
                // ScaledJob: spec.jobTargetRef.template.spec
                &doc["spec"]["jobTargetRef"]["template"]["spec"]
            };
            for c in spec["containers"].as_sequence().into_iter().flatten() {
                let image = c["image"].as_str().unwrap_or_default();
                if let Some(rest) = image.strip_prefix("ghcr.io/taskbus/") {
                    let name = rest.split(':').next().unwrap().to_string();
                    out.push((f.display().to_string(), name, c.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn every_image_is_an_oci_layout_that_skopeo_reads_and_deploy_can_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("images");
    build(&out, &[]);
    let built: BTreeSet<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(built, IMAGES.iter().map(|s| s.to_string()).collect());

    let mut images = BTreeMap::new();
    for name in IMAGES {
        let dir = out.join(name);
        let img = verify_layout(&dir);
        let c = &img.config["config"];
        assert_eq!(c["User"], "65532:65532", "{name}");
        assert_eq!(c["Entrypoint"], json!([format!("/usr/local/bin/{name}")]));
        assert_eq!(img.config["os"], "linux");
        assert_eq!(
            img.index["mediaType"],
            "application/vnd.oci.image.index.v1+json"
        );
        assert_eq!(
            img.index["manifests"][0]["annotations"]["io.containerd.image.name"],
            format!("ghcr.io/taskbus/{name}:{VERSION}")
        );
        assert_eq!(
            img.index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
            VERSION
        );
        assert_eq!(
            img.layers.len(),
            if name == "taskbus-gpu-dispatcher" {
                3
            } else {
                2
            }
        );

        // An independent reader: skopeo resolves the tag, and copying checks every digest.
        let reference = format!("oci:{}:{VERSION}", dir.display());
        let inspected: Json =
            serde_json::from_str(&run(Command::new("skopeo").args(["inspect", &reference])))
                .unwrap();
        assert_eq!(inspected["Digest"], img.manifest_digest, "{name}");
        assert_eq!(inspected["Architecture"], img.config["architecture"]);
        let copy = tmp.path().join(format!("copy-{name}"));
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            &reference,
            &format!("dir:{}", copy.display()),
        ]));
        images.insert(name, img);
    }

    // What deploy/ runs exists in the images: the image itself, its ports, its command.
    let containers = deploy_containers();
    assert!(containers.len() >= 6, "{containers:?}");
    for (file, name, c) in &containers {
        let img = images
            .get(name.as_str())
            .unwrap_or_else(|| panic!("{file} runs ghcr.io/taskbus/{name}, which is not built"));
        let exposed = &img.config["config"]["ExposedPorts"];
        for p in c["ports"].as_sequence().into_iter().flatten() {
            let port = format!("{}/tcp", p["containerPort"].as_u64().unwrap());
            assert!(
                exposed.get(&port).is_some(),
                "{file}: {name} does not expose {port}"
            );
        }
        if let Some(cmd) = c["command"].as_sequence() {
            let cmd: Vec<&str> = cmd.iter().filter_map(|v| v.as_str()).collect();
            // The local GPU dispatcher: tini from the image, then the binary found on PATH.
            assert_eq!(cmd, ["/usr/bin/tini", "--", name.as_str()], "{file}");
            assert_eq!(img.layers.len(), 3, "{file}: {name} has no tini layer");
        }
    }

    // The Dockerfile's targets are these images: same user, environment, entrypoint, ports.
    let stages = dockerfile_stages();
    let base = &stages["base"];
    for name in IMAGES {
        let c = &images[name].config["config"];
        let stage = stages
            .get(name)
            .unwrap_or_else(|| panic!("the Dockerfile has no target {name}"));
        assert_eq!(one_line(stage, "FROM"), "base AS ".to_string() + name);
        assert_eq!(
            one_line(stage, "COPY"),
            format!("--from=build /rootfs/{name}/ /"),
            "{name}"
        );
        let entry: Json = serde_json::from_str(&one_line(stage, "ENTRYPOINT")).unwrap();
        assert_eq!(entry, c["Entrypoint"], "{name}");
        let exposed: BTreeSet<String> = one_line(stage, "EXPOSE")
            .split_whitespace()
            .map(String::from)
            .collect();
        let ports: BTreeSet<String> = c["ExposedPorts"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        assert_eq!(exposed, ports, "{name}");
        assert_eq!(one_line(base, "USER"), c["User"].as_str().unwrap());
        assert_eq!(one_line(base, "WORKDIR"), c["WorkingDir"].as_str().unwrap());
        let env: Vec<String> = one_line(base, "ENV")
            .split_whitespace()
            .map(String::from)
            .collect();
        assert_eq!(json!(env), c["Env"], "{name}");
    }
    assert!(
        one_line(&stages["build"], "RUN")
            .contains("cargo xtask image --bin-dir target/release --rootfs /rootfs"),
        "{:?}",
        stages["build"]
    );

    // The same binaries give the same images.
    let again = tmp.path().join("again");
    build(&again, &[]);
    for name in IMAGES {
        assert_eq!(
            verify_layout(&again.join(name)).manifest_digest,
            images[name].manifest_digest,
            "{name} differs between two builds"
        );
    }
}

fn one_line(stage: &BTreeMap<String, Vec<String>>, k: &str) -> String {
    stage.get(k).map(|v| v.join(" ")).unwrap_or_default()
}

/// The repository's Dockerfile as stage name -> instruction -> arguments (continuations
/// joined, comments dropped; an instruction given twice keeps both, in order).
fn dockerfile_stages() -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let text = std::fs::read_to_string(deploy_dir().join("../Dockerfile")).unwrap();
    let mut lines = Vec::new();
    let mut cur = String::new();
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => cur.push_str(part),
            None => {
                cur.push_str(t);
                lines.push(std::mem::take(&mut cur));
            }
        }
    }
    let mut stages: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut name = String::new();
    for l in lines {
        let (ins, args) = l.split_once(' ').unwrap_or((&l, ""));
        let args = args.split_whitespace().collect::<Vec<_>>().join(" ");
        if ins == "FROM" {
            name = args.rsplit(' ').next().unwrap().to_string();
        }
        stages
            .entry(name.clone())
            .or_default()
            .entry(ins.to_string())
            .or_default()
            .push(args);
    }
    stages
}

#[test]
fn bad_arguments_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(foreign.join("taskbus-agent")).unwrap();
    std::fs::write(foreign.join("taskbus-agent/notes.txt"), "mine").unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--out", o, "--tag", "v1:2"], "invalid tag"),
        (vec!["--out", o, "--tag", ""], "invalid tag"),
        (vec!["--out", o, "--tag=-rc"], "invalid tag"),
        (
            vec!["--out", o, "--repository", "GHCR.io/Me"],
            "invalid repository",
        ),
        (
            vec!["--out", o, "--repository", "ghcr.io/me/"],
            "invalid repository",
        ),
        (
            vec!["--out", o, "--only", "taskbus-coordinatr"],
            "taskbus-coordinator",
        ),
        (vec!["--out", o, "--gzip-level", "10"], "0..=9"),
        (
            vec!["--out", o, "--bin-dir", "/nonexistent"],
            "cargo build --release --bins",
        ),
        (vec!["--out", file.to_str().unwrap()], "not a directory"),
        (
            vec![
                "--out",
                foreign.to_str().unwrap(),
                "--only",
                "taskbus-agent",
            ],
            "refusing to replace it",
        ),
        (vec!["--rootfs", o, "--out", o], "cannot be used with"),
    ];
    for (args, expected) in cases {
        let r = xtask(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{args:?} was accepted");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    assert_eq!(
        std::fs::read_to_string(foreign.join("taskbus-agent/notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

/// Unpack an image's layers, in order, into a fresh directory.
fn unpack(layout: &Path, root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    for layer in verify_layout(layout).layers {
        run(Command::new("tar")
            .arg("-xf")
            .arg(&layer)
            .arg("--same-owner")
            .arg("-C")
            .arg(root));
    }
}

/// A command that runs `argv` inside `root` as the images' user, with the images' environment.
fn in_image(root: &Path, argv: &[&str]) -> Command {
    // The environment below is the image's: resolve chroot itself on the host.
    let chroot = ["/usr/sbin/chroot", "/usr/bin/chroot"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("chroot (coreutils)");
    let mut c = Command::new(chroot);
    c.arg("--userspec=65532:65532")
        .arg(root)
        .args(argv)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/home/nonroot")
        .env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt");
    c
}

/// Every path under `root` with its size, mode and modification time.
fn listing(root: &Path) -> BTreeMap<PathBuf, (u64, u32, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p, (m.len(), m.mode(), m.mtime()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_run_their_binaries_as_nonroot_and_carry_a_task() {
    if !is_root() {
        eprintln!("skipped: unpacking the images and chroot into them needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("images");
    build(&out, &[]);
    let roots: BTreeMap<&str, PathBuf> = IMAGES
        .iter()
        .map(|n| {
            let root = tmp.path().join(format!("root-{n}"));
            unpack(&out.join(n), &root);
            (*n, root)
        })
        .collect();

    // Each binary runs from its image's files alone, as user 65532.
    for (name, root) in &roots {
        let v = run(&mut in_image(
            root,
            &[&format!("/usr/local/bin/{name}"), "--version"],
        ));
        assert_eq!(v.trim(), format!("{name} {VERSION}"));
    }
    // --rootfs (what the Dockerfile copies) writes the same files, modes and owners.
    let rootfs = tmp.path().join("rootfs");
    let o = xtask(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--only",
        "taskbus-gpu-dispatcher",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files = |root: &Path| -> BTreeMap<PathBuf, (u64, u32, u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        listing(root)
            .into_keys()
            .map(|p| {
                let m = std::fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                let size = if m.is_dir() { 0 } else { m.len() };
                (rel, (size, m.mode(), m.uid(), m.gid()))
            })
            .collect()
    };
    assert_eq!(
        files(&rootfs.join("taskbus-gpu-dispatcher")),
        files(&roots["taskbus-gpu-dispatcher"])
    );

    // The local GPU dispatcher's command: tini finds the dispatcher on PATH.
    let v = run(&mut in_image(
        &roots["taskbus-gpu-dispatcher"],
        &[
            "/usr/bin/tini",
            "-s",
            "--",
            "taskbus-gpu-dispatcher",
            "--version",
        ],
    ));
    assert!(v.contains(VERSION), "{v}");

    // The coordinator and an agent from their images carry a task, as deploy/ runs them.
    let stack = Stack::new(30_000).await;
    let (coord_root, agent_root) = (&roots["taskbus-coordinator"], &roots["taskbus-agent"]);
    let before = (listing(coord_root), listing(agent_root));
    let coord_http: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let agent_http: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let nats = format!("--nats-url={}", stack.nats.url());
    let mut coordinator = tokio::process::Command::from(in_image(
        coord_root,
        &[
            "/usr/local/bin/taskbus-coordinator",
            &nats,
            &format!("--http-listen={coord_http}"),
        ],
    ));
    let mut coordinator = coordinator
        .env("TASKBUS_DATABASE_URL", &stack.db.url)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut agent = tokio::process::Command::from(in_image(
        agent_root,
        &[
            "/usr/local/bin/taskbus-agent",
            &nats,
            "--pool=default",
            "--handler=echo",
            &format!("--http-listen={agent_http}"),
        ],
    ))
    .stdout(Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .unwrap();

    stack
        .submit(
            "default",
            json!({"id": "from-an-image", "kind": "echo", "payload": {"x": 1}}),
        )
        .await;
    let row = stack
        .wait_status("from-an-image", "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(row.status, "succeeded");
    let (code, body) = http_get(coord_http, "/metrics").await;
    assert!(
        code == 200 && body.contains("taskbus_coordinator_admitted_total"),
        "{code} {body}"
    );
    let (code, body) = http_get(agent_http, "/metrics").await;
    assert!(
        code == 200 && body.contains("taskbus_agent_"),
        "{code} {body}"
    );

    for child in [&mut coordinator, &mut agent] {
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
    // Nothing written: the pods run with a read-only root filesystem.
    assert_eq!((listing(coord_root), listing(agent_root)), before);
}

/// The Dockerfile's image stages, built by buildah from the files `cargo xtask image --rootfs`
/// writes (its compile stage needs the rust image from a registry this machine cannot reach, so
/// the test puts those files in its place): the images run, as user 65532, from the working
/// directory they name, with the configuration of the images xtask writes.
#[test]
fn the_dockerfiles_image_stages_build_with_buildah_and_run() {
    if !is_root() {
        eprintln!("skipped: buildah's chroot isolation and the chroot run need root");
        return;
    }
    let names = ["taskbus-coordinator", "taskbus-gpu-dispatcher"];
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    let rootfs = ctx.join("rootfs");
    let mut args = vec!["--rootfs", rootfs.to_str().unwrap()];
    let layouts = tmp.path().join("xtask");
    let mut layout_args = vec!["--out", layouts.to_str().unwrap()];
    for n in names {
        args.extend(["--only", n]);
        layout_args.extend(["--only", n]);
    }
    for a in [&args, &layout_args] {
        let o = xtask(a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let dockerfile = std::fs::read_to_string(deploy_dir().join("../Dockerfile")).unwrap();
    let start = dockerfile
        .find("FROM docker.io/library/rust:1-bookworm AS build")
        .expect("the compile stage");
    let end = dockerfile
        .find("FROM scratch AS base")
        .expect("the base stage");
    let test_file = format!(
        "{}FROM scratch AS build\nCOPY rootfs /rootfs\n\n{}",
        &dockerfile[..start],
        &dockerfile[end..]
    );
    std::fs::write(ctx.join("Dockerfile"), test_file).unwrap();
    let storage = tmp.path().join("storage");
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        run(&mut c)
    };
    for name in names {
        let tag = format!("localhost/{name}:test");
        buildah(&[
            "bud",
            "--quiet",
            "--isolation",
            "chroot",
            "--target",
            name,
            "-t",
            &tag,
            "-f",
            ctx.join("Dockerfile").to_str().unwrap(),
            ctx.to_str().unwrap(),
        ]);
        let out = tmp.path().join("built").join(name);
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        buildah(&[
            "push",
            "--quiet",
            &tag,
            &format!("oci:{}:test", out.display()),
        ]);
        let built = verify_layout(&out);
        let ours = verify_layout(&layouts.join(name));
        for k in ["User", "Env", "Entrypoint", "WorkingDir", "ExposedPorts"] {
            assert_eq!(
                built.config["config"][k], ours.config["config"][k],
                "{name}: {k} differs between the Dockerfile and xtask"
            );
        }
        let root = tmp.path().join(format!("root-{name}"));
        unpack(&out, &root);
        // Every file of the image, with its permissions (a COPY makes root the owner).
        use std::os::unix::fs::MetadataExt;
        let want = rootfs.join(name);
        for (path, _) in listing(&want) {
            let rel = path.strip_prefix(&want).unwrap();
            let (a, b) = (
                std::fs::symlink_metadata(&path).unwrap(),
                std::fs::symlink_metadata(root.join(rel))
                    .unwrap_or_else(|e| panic!("{name}: /{} missing: {e}", rel.display())),
            );
            assert_eq!(
                a.mode() & 0o7777,
                b.mode() & 0o7777,
                "{name}: /{}",
                rel.display()
            );
            if a.is_file() {
                assert_eq!(a.len(), b.len(), "{name}: /{}", rel.display());
            }
        }
        // The runtime enters the working directory as the image's user.
        let mut dir = PathBuf::from("/");
        for part in Path::new(ours.config["config"]["WorkingDir"].as_str().unwrap())
            .iter()
            .skip(1)
        {
            dir.push(part);
            let m = std::fs::metadata(root.join(dir.strip_prefix("/").unwrap())).unwrap();
            assert!(
                m.uid() == 65532 || m.mode() & 0o001 != 0,
                "{name}: user 65532 cannot enter {}",
                dir.display()
            );
        }
        let v = run(&mut in_image(
            &root,
            &[&format!("/usr/local/bin/{name}"), "--version"],
        ));
        assert_eq!(v.trim(), format!("{name} {VERSION}"));
    }
}
