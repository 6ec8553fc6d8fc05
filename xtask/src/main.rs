//! Build tasks of this repository. `cargo xtask image` writes container images of the
//! binaries as OCI image layouts, with no container engine (docs/DEPLOY.md, "Container images").

mod image;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build tasks of the taskbus repository"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write container images of the binaries as OCI image layouts, one directory per image
    /// (no Docker needed). Build the binaries first: `cargo build --release --bins`. Push one
    /// with `skopeo copy oci:target/images/taskbus-coordinator:0.1.0
    /// docker://ghcr.io/you/taskbus-coordinator:0.1.0`, or `crane push DIR REF`.
    #[command(
        after_help = "Images: taskbus, taskbus-coordinator, taskbus-agent, taskbus-ledger, taskbus-scaler, taskbus-gpu-dispatcher.\n\
                      Each runs as user 65532 with the binary at /usr/local/bin/<name> as its entrypoint, on the C runtime\n\
                      of this machine (the glibc the binaries were linked against) and its CA bundle."
    )]
    Image(ImageArgs),
}

#[derive(clap::Args)]
struct ImageArgs {
    /// Build only this image (repeat for more); all of them by default
    #[arg(long = "only", value_name = "NAME")]
    only: Vec<String>,
    /// Where the built binaries are [default: $CARGO_TARGET_DIR/release, else target/release]
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Directory to write the layouts into, one subdirectory per image; an earlier layout
    /// there is replaced [default: images/ beside the binaries' profile directory]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Image tag (the workspace version by default)
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    tag: String,
    /// Registry and path the images are named under: `<repository>/<image>:<tag>` is recorded
    /// in each layout's index (`io.containerd.image.name`)
    #[arg(long, default_value = "ghcr.io/taskbus")]
    repository: String,
    /// Keep the binaries' debug information (release builds carry line tables, which make the
    /// images several times larger)
    #[arg(long)]
    no_strip: bool,
    /// gzip level of the layers, 0 (none) to 9 (smallest)
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=9))]
    gzip_level: u32,
    /// Write each image's files as a directory tree under DIR/<image>/ instead of a layout
    /// (what the Dockerfile copies; owners are set when run as root). DIR/<image> must not
    /// exist or be empty
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    rootfs: Option<PathBuf>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(workspace())
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// File times and `created`: SOURCE_DATE_EPOCH, else the commit's time, else the epoch.
fn epoch() -> anyhow::Result<i64> {
    if let Some(v) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        return v
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|s| *s >= 0)
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"));
    }
    Ok(git(&["log", "-1", "--format=%ct"])
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

fn image(args: ImageArgs) -> anyhow::Result<()> {
    let specs = image::select(&args.only)?;
    image::validate_tag(&args.tag)?;
    image::validate_repository(&args.repository)?;
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target"))
            .join("release")
    });
    let opts = image::Options {
        bin_dir: bin_dir.clone(),
        tag: args.tag.clone(),
        repository: args.repository.clone(),
        strip: !args.no_strip,
        gzip_level: args.gzip_level,
        epoch: epoch()?,
        revision: git(&["rev-parse", "HEAD"]),
    };
    eprintln!(
        "reading {} binar{} from {}",
        specs.len(),
        if specs.len() == 1 { "y" } else { "ies" },
        bin_dir.display()
    );
    let parts = image::gather(&specs, &opts)?;
    if let Some(root) = &args.rootfs {
        for s in &specs {
            let dir = root.join(s.name);
            image::write_rootfs(s, &parts, &dir)?;
            println!("{:<24} {}", s.name, dir.display());
        }
        return Ok(());
    }
    let out = args.out.clone().unwrap_or_else(|| {
        bin_dir
            .parent()
            .map(|p| p.join("images"))
            .unwrap_or_else(|| PathBuf::from("images"))
    });
    if out.exists() && !out.is_dir() {
        bail!("{} is not a directory: choose another --out", out.display());
    }
    for s in &specs {
        let built = image::write_image(s, &parts, &opts, &out.join(s.name))?;
        println!(
            "{:<24} {:<52} {}",
            built.name, built.reference, built.manifest.digest
        );
    }
    eprintln!(
        "\nwritten under {dir}. Push an image with\n  skopeo copy oci:{dir}/{first}:{tag} docker://{repo}/{first}:{tag}\n\
         and set the same names in your kustomize overlay (docs/DEPLOY.md, \"Container images\").",
        dir = out.display(),
        first = specs[0].name,
        tag = opts.tag,
        repo = opts.repository,
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Image(a) => image(a),
    }
}
