//! Root rotation as a staged, inspectable state machine kept on disk, so that it survives
//! restarts of the CA and works the same for every replica that shares the data dir.
//!
//! ```text
//! idle --start--> add-root --(every node holds the new root)--> reissue --finish--> idle
//!                    |                                             |      (only when no leaf
//!                    +------------------abort----------------------+       of the old root
//!                                                                           is still valid)
//! ```
//!
//! - **add-root** (`meshgate ca rotate start`): a new root, a new intermediate signed by it, and
//!   a cross-signed copy of that intermediate signed by the old root. Every trust bundle
//!   carries both roots; the CA still signs under the old one. It waits until every node that
//!   joined (and is not revoked) has reported holding a bundle with the new root.
//! - **reissue** (entered by `ca serve` on its own): the CA signs under the new root, and every
//!   chain it hands out carries the new intermediate and its cross-signed copy, so a peer that
//!   holds only the old root verifies new leaves too (and old leaves still verify under the old
//!   root, which stays in the bundle). The bundle names the new root as the signing root, so
//!   nodes renew every leaf at once. Pinned fingerprints for new joins are the new root's. It
//!   waits until no leaf signed under the old root is valid any more (the issuance log says).
//! - **finish** (`meshgate ca rotate finish`, refused before that): the new root and
//!   intermediate take the place of the old ones, the old root leaves every bundle and is kept
//!   under `retired/`; its key is deleted.
//! - **abort** (`meshgate ca rotate abort`, in either stage): back to the old root only. Leaves
//!   already signed under the new root keep verifying through the cross-signed intermediate;
//!   nodes renew them at once.
//!
//! Files: `rotation/state.json` (written last, so a half-made rotation never starts),
//! `rotation/root.{crt,key}`, `rotation/intermediate.{crt,key}`,
//! `rotation/cross-intermediate.crt`.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::{
    pki::{self, CertInfo, PkiError},
    signer::Signer,
    store::{
        self, CA_BACKDATE, Denylist, INTERMEDIATE_TTL, NodeRegistry, ROOT_TTL, Reports, StoreError,
    },
};

/// A stage of a root rotation in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Both roots in every bundle; signing under the old root.
    AddRoot,
    /// Signing under the new root; waiting for the old root's leaves to expire.
    Reissue,
    /// `finish` is moving the new root into place (a crash here is completed on next load).
    Finishing,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::AddRoot => "add-root",
            Stage::Reissue => "reissue",
            Stage::Finishing => "finishing",
        })
    }
}

/// `rotation/state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationState {
    /// Where the rotation is.
    pub stage: Stage,
    /// Fingerprint of the root being retired.
    pub old_root: String,
    /// Fingerprint of the root taking over.
    pub new_root: String,
    /// Unix seconds of `start`.
    pub started_at: u64,
    /// Unix seconds of the move to [`Stage::Reissue`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reissue_at: Option<u64>,
}

fn dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join("rotation")
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether a root rotation is in progress in `data_dir`.
pub fn in_progress(data_dir: &Path) -> bool {
    dir_of(data_dir).join("state.json").exists()
}

/// The rotation in progress, if any.
pub fn load_state(data_dir: &Path) -> Result<Option<RotationState>, StoreError> {
    let path = dir_of(data_dir).join("state.json");
    match fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Pki(PkiError::Io {
            path: path.display().to_string(),
            source,
        })),
    }
}

fn save_state(data_dir: &Path, state: &RotationState) -> Result<(), StoreError> {
    let json = serde_json::to_vec_pretty(state).expect("invariant: state serializes");
    pki::write_atomic(&dir_of(data_dir).join("state.json"), &json, 0o600)?;
    Ok(())
}

/// What the CA signs with and which roots it publishes, as the data dir says now.
#[derive(Debug)]
pub struct Signing {
    /// The signer (intermediate key, chain, root fingerprint).
    pub signer: Signer,
    /// The roots of the trust bundle (without `extra-roots.pem`), the signing root first.
    pub roots: Vec<CertificateDer<'static>>,
    /// The stage, when a rotation is in progress.
    pub stage: Option<Stage>,
}

impl Signing {
    /// Fingerprint of the root the CA signs under.
    pub fn signing_root(&self) -> &str {
        self.signer.root_fingerprint()
    }
}

/// Loads what the CA signs with now: the data dir's root and intermediate, or during a
/// rotation's reissue stage the new intermediate and its cross-signed copy. A `finish` that was
/// interrupted is completed first.
pub fn signing(data_dir: &Path) -> Result<Signing, StoreError> {
    let mut state = load_state(data_dir)?;
    if state.as_ref().is_some_and(|s| s.stage == Stage::Finishing) {
        complete_finish(data_dir)?;
        state = None;
    }
    let ca = store::load(data_dir)?;
    let old_fp = ca.root_fingerprint();
    let Some(state) = state else {
        let signer = Signer::new(ca.intermediate, ca.intermediate_key, &old_fp)
            .map_err(|e| sign_err(data_dir, e))?;
        return Ok(Signing {
            signer,
            roots: vec![ca.root],
            stage: None,
        });
    };
    let rot = dir_of(data_dir);
    let new_root = store::first_cert(&rot.join("root.crt"))?;
    let new_fp = pki::fingerprint(&new_root);
    if new_fp != state.new_root || old_fp != state.old_root {
        return Err(StoreError::Corrupt {
            path: rot.join("state.json").display().to_string(),
            reason: format!(
                "the rotation is from root {} to {}, but the data dir holds {old_fp} and {new_fp}",
                state.old_root, state.new_root
            ),
        });
    }
    match state.stage {
        Stage::AddRoot => {
            let signer = Signer::new(ca.intermediate, ca.intermediate_key, &old_fp)
                .map_err(|e| sign_err(data_dir, e))?;
            Ok(Signing {
                signer,
                roots: vec![ca.root, new_root],
                stage: Some(Stage::AddRoot),
            })
        }
        Stage::Reissue | Stage::Finishing => {
            let int = store::first_cert(&rot.join("intermediate.crt"))?;
            let key = store::load_key(&rot.join("intermediate.key"))?;
            let cross = store::first_cert(&rot.join("cross-intermediate.crt"))?;
            let signer = Signer::new(int, key, &new_fp)
                .map_err(|e| sign_err(data_dir, e))?
                .with_extra(vec![cross]);
            Ok(Signing {
                signer,
                roots: vec![new_root, ca.root],
                stage: Some(Stage::Reissue),
            })
        }
    }
}

fn sign_err(data_dir: &Path, e: crate::signer::SignError) -> StoreError {
    StoreError::Corrupt {
        path: data_dir.display().to_string(),
        reason: e.to_string(),
    }
}

fn dated_name(kind: &str, trust_domain: &str, now: SystemTime) -> String {
    let date = store::rfc3339(now);
    let date = date.get(..10).unwrap_or(&date).replace('-', "");
    format!("meshgate {kind} CA {trust_domain} {date}")
}

/// `ca rotate start`: makes the new root, its intermediate and the cross-signed copy, and
/// enters [`Stage::AddRoot`]. Refused while a rotation is in progress.
pub fn start(data_dir: &Path, now: SystemTime) -> Result<RotationState, StoreError> {
    if let Some(s) = load_state(data_dir)? {
        return Err(StoreError::Request(format!(
            "a root rotation is already in progress (stage {}): `meshgate ca rotate status` says what it waits for",
            s.stage
        )));
    }
    let ca = store::load(data_dir)?;
    let td = ca.trust_domain.clone();
    let old_key = store::load_key(&data_dir.join("root.key"))?;
    let old_info = CertInfo::from_der(&ca.root)?;
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;

    let root_key = KeyPair::generate_for(alg)?;
    let root_params = store::ca_params(&td, &dated_name("root", &td, now), now, ROOT_TTL, Some(1))?;
    let root = root_params.self_signed(&root_key)?;
    let int_key = KeyPair::generate_for(alg)?;
    let int_params = store::ca_params(
        &td,
        &dated_name("intermediate", &td, now),
        now,
        INTERMEDIATE_TTL,
        Some(0),
    )?;
    let new_issuer = rcgen::Issuer::from_params(&root_params, &root_key);
    let int = int_params.signed_by(&int_key, &new_issuer)?;
    // the same subject and key, signed by the old root: valid no longer than the old root
    let mut cross_params = int_params.clone();
    let mut serial = pki::random_bytes::<16>();
    serial[0] &= 0x7f;
    cross_params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    cross_params.not_after = (now + INTERMEDIATE_TTL).min(old_info.not_after).into();
    cross_params.not_before = (now - CA_BACKDATE).into();
    let old_issuer = rcgen::Issuer::from_ca_cert_der(&ca.root, old_key)?;
    let cross = cross_params.signed_by(&int_key, &old_issuer)?;

    let rot = dir_of(data_dir);
    pki::create_private_dir(&rot)?;
    pki::write_atomic(
        &rot.join("root.key"),
        root_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    pki::write_atomic(
        &rot.join("intermediate.key"),
        int_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    pki::write_atomic(&rot.join("root.crt"), root.pem().as_bytes(), 0o644)?;
    pki::write_atomic(&rot.join("intermediate.crt"), int.pem().as_bytes(), 0o644)?;
    pki::write_atomic(
        &rot.join("cross-intermediate.crt"),
        cross.pem().as_bytes(),
        0o644,
    )?;
    let state = RotationState {
        stage: Stage::AddRoot,
        old_root: ca.root_fingerprint(),
        new_root: pki::fingerprint(root.der()),
        started_at: unix(now),
        reissue_at: None,
    };
    save_state(data_dir, &state)?;
    Ok(state)
}

/// Moves [`Stage::AddRoot`] on to [`Stage::Reissue`] once every node holds the new root.
/// `ca serve` calls this on every report and on its reload timer. Returns the stage entered.
pub fn advance(data_dir: &Path, now: SystemTime) -> Result<Option<Stage>, StoreError> {
    let Some(mut state) = load_state(data_dir)? else {
        return Ok(None);
    };
    if state.stage != Stage::AddRoot {
        return Ok(None);
    }
    let nodes = node_bundles(data_dir, &state, now);
    if nodes.iter().any(|n| !n.holds_new) {
        return Ok(None);
    }
    state.stage = Stage::Reissue;
    state.reissue_at = Some(unix(now));
    save_state(data_dir, &state)?;
    Ok(Some(Stage::Reissue))
}

/// `ca rotate finish`: retires the old root, or says what the rotation still waits for.
pub fn finish(data_dir: &Path, now: SystemTime) -> Result<FinishReport, StoreError> {
    let status = status(data_dir, now)?;
    let Some(mut state) = status.state.clone() else {
        return Err(StoreError::Request(
            "no root rotation is in progress: `meshgate ca rotate plan` shows what one does".into(),
        ));
    };
    if !status.can_finish() {
        return Err(StoreError::Request(format!(
            "the old root cannot be retired yet: {}; `meshgate ca rotate status` shows the rest",
            status.waiting_for().join("; ")
        )));
    }
    state.stage = Stage::Finishing;
    save_state(data_dir, &state)?;
    complete_finish(data_dir)?;
    Ok(FinishReport {
        retired_root: state.old_root,
        root: state.new_root,
    })
}

/// What `finish` did.
#[derive(Debug, Clone, Serialize)]
pub struct FinishReport {
    /// Fingerprint of the retired root (its certificate is kept under `retired/`).
    pub retired_root: String,
    /// Fingerprint of the root now in place: what new joins pin.
    pub root: String,
}

/// The file moves of `finish`, safe to run again after a crash: new key and certificate files
/// into place (keys first, `root.crt` last), the old root archived, `rotation/` removed.
fn complete_finish(data_dir: &Path) -> Result<(), StoreError> {
    let rot = dir_of(data_dir);
    let copy = |from: &str, to: &str, mode: u32| -> Result<(), StoreError> {
        let src = rot.join(from);
        if !src.exists() {
            return Ok(());
        }
        let data = fs::read(&src).map_err(|source| PkiError::Io {
            path: src.display().to_string(),
            source,
        })?;
        pki::write_atomic(&data_dir.join(to), &data, mode)?;
        Ok(())
    };
    // archive the old root and intermediate unless this already ran
    if let Ok(old) = store::first_cert(&data_dir.join("root.crt"))
        && rot.join("root.crt").exists()
        && pki::fingerprint(&old) != pki::fingerprint(&store::first_cert(&rot.join("root.crt"))?)
    {
        let retired = data_dir.join("retired");
        pki::create_private_dir(&retired)?;
        let name = pki::fingerprint(&old).replace("sha256:", "root-");
        pki::write_atomic(
            &retired.join(format!("{}.crt", &name[..name.len().min(21)])),
            pki::certs_to_pem(std::slice::from_ref(&old)).as_bytes(),
            0o644,
        )?;
        if let Ok(int) = store::first_cert(&data_dir.join("intermediate.crt")) {
            let info = CertInfo::from_der(&int)?;
            let archive = data_dir.join("intermediates");
            pki::create_private_dir(&archive)?;
            pki::write_atomic(
                &archive.join(format!("{}.crt", info.serial)),
                pki::certs_to_pem(&[int]).as_bytes(),
                0o644,
            )?;
        }
    }
    copy("intermediate.key", "intermediate.key", 0o600)?;
    copy("root.key", "root.key", 0o600)?;
    copy("intermediate.crt", "intermediate.crt", 0o644)?;
    copy("root.crt", "root.crt", 0o644)?;
    fs::remove_dir_all(&rot).map_err(|source| PkiError::Io {
        path: rot.display().to_string(),
        source,
    })?;
    Ok(())
}

/// `ca rotate abort`: back to the old root alone, from either stage.
pub fn abort(data_dir: &Path) -> Result<RotationState, StoreError> {
    let Some(state) = load_state(data_dir)? else {
        return Err(StoreError::Request(
            "no root rotation is in progress; nothing to abort".into(),
        ));
    };
    if state.stage == Stage::Finishing {
        return Err(StoreError::Request(
            "the rotation is finishing (the old root is being retired); it cannot be aborted: start `meshgate ca serve` (or run `meshgate ca rotate status`) to complete it".into(),
        ));
    }
    let rot = dir_of(data_dir);
    // state first: from that moment the CA signs under the old root again
    let state_file = rot.join("state.json");
    fs::remove_file(&state_file).map_err(|source| PkiError::Io {
        path: state_file.display().to_string(),
        source,
    })?;
    fs::remove_dir_all(&rot).map_err(|source| PkiError::Io {
        path: rot.display().to_string(),
        source,
    })?;
    Ok(state)
}

/// One node's bundle, as rotation sees it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeBundle {
    /// The node.
    pub node: String,
    /// The sequence it last reported (none: it never reported).
    pub sequence: Option<u64>,
    /// When, RFC 3339.
    pub reported_at: Option<String>,
    /// Whether that bundle holds the new root.
    pub holds_new: bool,
}

fn node_bundles(data_dir: &Path, state: &RotationState, now: SystemTime) -> Vec<NodeBundle> {
    let reports = Reports::new(data_dir);
    let deny = Denylist::new(data_dir);
    let revoked: Vec<String> = deny
        .list(now)
        .into_iter()
        .filter(|(_, r)| r.node_refused)
        .map(|(n, _)| n)
        .collect();
    NodeRegistry::new(data_dir)
        .list()
        .into_iter()
        .filter(|(n, _)| !revoked.contains(n))
        .map(|(node, _)| {
            let r = reports.get(&node);
            NodeBundle {
                holds_new: r
                    .as_ref()
                    .is_some_and(|r| r.roots.contains(&state.new_root)),
                sequence: r.as_ref().map(|r| r.sequence),
                reported_at: r.map(|r| store::rfc3339_unix(r.at)),
                node,
            }
        })
        .collect()
}

/// Everything `ca rotate status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct RotationStatus {
    /// The rotation, if one is in progress.
    pub state: Option<RotationState>,
    /// Fingerprint of the root in `root.crt`.
    pub root: String,
    /// Expiry of the signing intermediate, RFC 3339.
    pub intermediate_not_after: String,
    /// Seconds left on it.
    pub intermediate_seconds_left: u64,
    /// Every node that joined and is not revoked, with the bundle it holds.
    pub nodes: Vec<NodeBundle>,
    /// Leaves signed under the old root that are still valid.
    pub old_leaves_alive: usize,
    /// When the last of them expires, RFC 3339.
    pub old_leaves_until: Option<String>,
}

/// The rotation's state and what it waits for, from the data dir.
pub fn status(data_dir: &Path, now: SystemTime) -> Result<RotationStatus, StoreError> {
    let mut state = load_state(data_dir)?;
    if state.as_ref().is_some_and(|s| s.stage == Stage::Finishing) {
        complete_finish(data_dir)?;
        state = None;
    }
    let ca = store::load(data_dir)?;
    let int = CertInfo::from_der(&ca.intermediate)?;
    let root = ca.root_fingerprint();
    let (nodes, old_leaves_alive, old_leaves_until) = match &state {
        Some(s) => {
            let old: Vec<SystemTime> = store::issued_alive(data_dir, now)
                .into_iter()
                .filter(|r| r.root.as_deref().is_none_or(|fp| fp == s.old_root))
                .map(|r| r.expires())
                .collect();
            (
                node_bundles(data_dir, s, now),
                old.len(),
                old.iter().max().map(|t| store::rfc3339(*t)),
            )
        }
        None => (
            NodeRegistry::new(data_dir)
                .list()
                .into_iter()
                .map(|(node, _)| {
                    let r = Reports::new(data_dir).get(&node);
                    NodeBundle {
                        holds_new: false,
                        sequence: r.as_ref().map(|r| r.sequence),
                        reported_at: r.map(|r| store::rfc3339_unix(r.at)),
                        node,
                    }
                })
                .collect(),
            0,
            None,
        ),
    };
    Ok(RotationStatus {
        state,
        root,
        intermediate_not_after: store::rfc3339(int.not_after),
        intermediate_seconds_left: int.remaining(now).as_secs(),
        nodes,
        old_leaves_alive,
        old_leaves_until,
    })
}

impl RotationStatus {
    /// The stage, `idle` when no rotation is in progress.
    pub fn stage(&self) -> String {
        self.state
            .as_ref()
            .map_or_else(|| "idle".to_owned(), |s| s.stage.to_string())
    }

    /// Nodes that do not hold the new root yet.
    pub fn nodes_without_new_root(&self) -> Vec<&NodeBundle> {
        self.nodes.iter().filter(|n| !n.holds_new).collect()
    }

    /// Whether `finish` may retire the old root now.
    pub fn can_finish(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|s| s.stage == Stage::Reissue)
            && self.nodes_without_new_root().is_empty()
            && self.old_leaves_alive == 0
    }

    /// What the current stage waits for, one line each (empty when nothing).
    pub fn waiting_for(&self) -> Vec<String> {
        let Some(state) = &self.state else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let missing = self.nodes_without_new_root();
        if !missing.is_empty() {
            let names: Vec<String> = missing
                .iter()
                .map(|n| match (&n.sequence, &n.reported_at) {
                    (Some(seq), Some(at)) => {
                        format!("{} (holds bundle {seq}, reported {at})", n.node)
                    }
                    _ => format!("{} (never reported a bundle)", n.node),
                })
                .collect();
            out.push(format!(
                "{} of {} nodes do not hold the new root yet: {} (a node reports when it applies a bundle; one that is gone for good can be removed with `meshgate ca node remove NAME`)",
                missing.len(),
                self.nodes.len(),
                names.join(", ")
            ));
        }
        match state.stage {
            Stage::AddRoot => {}
            Stage::Reissue | Stage::Finishing if self.old_leaves_alive > 0 => out.push(format!(
                "{} certificates signed under the old root are still valid, the last until {}",
                self.old_leaves_alive,
                self.old_leaves_until.as_deref().unwrap_or("-")
            )),
            _ => {}
        }
        if state.stage == Stage::AddRoot && missing.is_empty() {
            out.push("`meshgate ca serve` to move on to reissue (it does so on its own)".into());
        }
        out
    }
}

impl fmt::Display for RotationStatus {
    /// What `meshgate ca rotate status` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let left = humantime::format_duration(Duration::from_secs(
            self.intermediate_seconds_left / 60 * 60,
        ));
        writeln!(
            f,
            "signing intermediate expires {} (in {left}){}",
            self.intermediate_not_after,
            if self.intermediate_seconds_left < store::INTERMEDIATE_WARNING.as_secs() {
                ": rotate it with `meshgate ca intermediate rotate`"
            } else {
                ""
            }
        )?;
        let Some(state) = &self.state else {
            writeln!(f, "root rotation: idle (root {})", self.root)?;
            return write!(
                f,
                "`meshgate ca rotate plan` shows what a rotation does; `meshgate ca rotate start` begins one"
            );
        };
        writeln!(
            f,
            "root rotation: stage {} (from {} to {}, started {})",
            state.stage,
            state.old_root,
            state.new_root,
            store::rfc3339_unix(state.started_at)
        )?;
        let stage1 = match state.stage {
            Stage::AddRoot => {
                "in progress: every bundle carries both roots; signing under the old root"
                    .to_owned()
            }
            _ => format!(
                "done: every node holds the new root{}",
                state
                    .reissue_at
                    .map(|t| format!(" (since {})", store::rfc3339_unix(t)))
                    .unwrap_or_default()
            ),
        };
        writeln!(f, "  1. add-root  {stage1}")?;
        let stage2 = match state.stage {
            Stage::AddRoot => {
                "pending: the CA signs under the new root once every node holds it".to_owned()
            }
            _ if self.old_leaves_alive == 0 => {
                "done: no certificate of the old root is valid any more".to_owned()
            }
            _ => {
                "in progress: signing under the new root; nodes renew their certificates".to_owned()
            }
        };
        writeln!(f, "  2. reissue   {stage2}")?;
        let stage3 = if self.can_finish() {
            "ready: run `meshgate ca rotate finish` to retire the old root"
        } else {
            "pending: `meshgate ca rotate finish` retires the old root once stage 2 is done"
        };
        writeln!(f, "  3. retire    {stage3}")?;
        let waits = self.waiting_for();
        if waits.is_empty() {
            write!(f, "waiting for: nothing")?;
        } else {
            write!(f, "waiting for:")?;
            for w in waits {
                write!(f, "\n  - {w}")?;
            }
        }
        Ok(())
    }
}

/// What `ca rotate plan` prints: the stages, and what each would wait for right now.
pub fn plan(data_dir: &Path, now: SystemTime) -> Result<String, StoreError> {
    let status = status(data_dir, now)?;
    if let Some(s) = &status.state {
        return Ok(format!(
            "a root rotation is already in progress (stage {}):\n{status}",
            s.stage
        ));
    }
    let ca = store::load(data_dir)?;
    let root = CertInfo::from_der(&ca.root)?;
    let alive = store::issued_alive(data_dir, now);
    let last = alive.iter().map(|r| r.expires()).max();
    let nodes: Vec<&str> = status.nodes.iter().map(|n| n.node.as_str()).collect();
    Ok(format!(
        "root rotation plan for trust domain {td} (nothing changes until `meshgate ca rotate start`)\n\
         current root {fp}, expires {exp}\n\
         1. add-root  `start` makes a new root, a new intermediate signed by it, and a copy of that\n\
         \x20            intermediate cross-signed by the current root; every trust bundle carries both\n\
         \x20            roots. Waits until every node reports holding the new root ({n} nodes: {names}).\n\
         2. reissue   the CA signs under the new root; chains carry the cross-signed intermediate, so\n\
         \x20            peers that hold only the old root still verify them. Nodes renew every\n\
         \x20            certificate at once. New joins pin the new root. Waits until no certificate of the\n\
         \x20            old root is valid ({alive} are valid now{until}).\n\
         3. retire    `finish` drops the old root from every bundle and deletes its key.\n\
         `meshgate ca rotate abort` returns to the current root from stage 1 or 2 without a failed\n\
         handshake; `meshgate ca rotate status` says what each stage waits for.",
        td = ca.trust_domain,
        fp = ca.root_fingerprint(),
        exp = store::rfc3339(root.not_after),
        n = nodes.len(),
        names = if nodes.is_empty() {
            "none".to_owned()
        } else {
            nodes.join(", ")
        },
        alive = alive.len(),
        until = last
            .map(|t| format!(", the last until {}", store::rfc3339(t)))
            .unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        spiffe::SpiffeId,
        verify::{TrustBundle, Usage, verify_svid},
    };

    const TD: &str = "mesh.example";

    fn unix_time(t: SystemTime) -> rustls_pki_types::UnixTime {
        rustls_pki_types::UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).expect("time"))
    }

    /// Signs a workload leaf with what the data dir signs with now: the chain.
    fn leaf(dir: &Path, now: SystemTime) -> Vec<CertificateDer<'static>> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let id = SpiffeId::workload(TD, "default", "web").expect("id");
        signing(dir)
            .expect("signing")
            .signer
            .sign(&id, &key, Duration::from_secs(3600), now)
            .expect("sign")
    }

    /// Whether `chain` verifies against a bundle of `roots` only.
    fn verifies(roots: &[&CertificateDer<'static>], chain: &[CertificateDer<'static>]) -> bool {
        let b =
            TrustBundle::new(TD, roots.iter().map(|r| (*r).clone()).collect(), 0).expect("bundle");
        verify_svid(
            &b,
            &chain[0],
            &chain[1..],
            unix_time(SystemTime::now()),
            Usage::Client,
        )
        .is_ok()
    }

    fn root_at(path: &Path) -> CertificateDer<'static> {
        store::first_cert(path).expect("root")
    }

    #[test]
    fn stages_move_on_only_when_what_they_wait_for_is_done() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let now = SystemTime::now();
        store::init(dir, TD, false, now).expect("init");
        NodeRegistry::new(dir)
            .register("node-a", "default", &[], now)
            .expect("register");
        let old = root_at(&dir.join("root.crt"));
        let old_fp = pki::fingerprint(&old);
        assert_eq!(status(dir, now).expect("status").stage(), "idle");
        assert!(plan(dir, now).expect("plan").contains("1. add-root"));
        let old_leaf = leaf(dir, now);
        store::append_issued(
            dir,
            &store::IssuedRecord {
                serial: "01".into(),
                spiffe_id: "spiffe://mesh.example/ns/default/svc/web".into(),
                node: "node-a".into(),
                not_after: store::rfc3339(now + Duration::from_secs(60)),
                root: Some(old_fp.clone()),
            },
        )
        .expect("log");

        let state = start(dir, now).expect("start");
        assert_eq!((state.stage, &state.old_root), (Stage::AddRoot, &old_fp));
        let again = start(dir, now).expect_err("twice").to_string();
        assert!(again.contains("already in progress"), "{again}");
        let refused = store::rotate_intermediate(dir, Duration::from_secs(3600), now)
            .expect_err("during a rotation")
            .to_string();
        assert!(refused.contains("finish or abort it first"), "{refused}");
        let s = signing(dir).expect("signing");
        assert_eq!(
            s.signing_root(),
            old_fp,
            "stage 1 still signs under the old root"
        );
        assert_eq!(s.roots.len(), 2);
        let new = root_at(&dir.join("rotation/root.crt"));
        assert_eq!(pki::fingerprint(&new), state.new_root);

        // stage 1 waits for every node to report the new root
        assert_eq!(advance(dir, now).expect("advance"), None);
        let reports = Reports::new(dir);
        reports
            .record("node-a", 2, vec![old_fp.clone()], now)
            .expect("report");
        assert_eq!(advance(dir, now).expect("advance"), None);
        let waits = status(dir, now).expect("status").waiting_for().join("; ");
        assert!(waits.contains("node-a (holds bundle 2"), "{waits}");
        reports
            .record(
                "node-a",
                3,
                vec![old_fp.clone(), state.new_root.clone()],
                now,
            )
            .expect("report");
        assert_eq!(advance(dir, now).expect("advance"), Some(Stage::Reissue));

        // stage 2: new leaves verify with either root alone; old ones with the old root
        assert_eq!(
            signing(dir).expect("signing").signing_root(),
            state.new_root
        );
        let new_leaf = leaf(dir, now);
        assert_eq!(
            new_leaf.len(),
            3,
            "leaf, intermediate, cross-signed intermediate"
        );
        assert!(verifies(&[&new], &new_leaf) && verifies(&[&old], &new_leaf));
        assert!(verifies(&[&old], &old_leaf) && !verifies(&[&new], &old_leaf));
        let err = finish(dir, now).expect_err("old leaf alive").to_string();
        assert!(err.contains("still valid"), "{err}");

        // stage 3, once the old root's last certificate expired
        let later = now + Duration::from_secs(120);
        assert!(status(dir, later).expect("status").can_finish());
        let done = finish(dir, later).expect("finish");
        assert_eq!(
            (done.retired_root, &done.root),
            (old_fp.clone(), &state.new_root)
        );
        assert_eq!(
            pki::fingerprint(&root_at(&dir.join("root.crt"))),
            state.new_root
        );
        assert!(!dir.join("rotation").exists() && dir.join("retired").is_dir());
        let s = signing(dir).expect("signing");
        assert_eq!(
            (s.roots.len(), s.signing_root()),
            (1, state.new_root.as_str())
        );
        assert_eq!(leaf(dir, later).len(), 2, "no cross-signed copy any more");
        assert_eq!(status(dir, later).expect("status").stage(), "idle");
    }

    #[test]
    fn abort_returns_to_the_old_root_and_leaves_of_the_new_one_still_verify() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let now = SystemTime::now();
        store::init(dir, TD, false, now).expect("init");
        let old = root_at(&dir.join("root.crt"));
        let state = start(dir, now).expect("start");
        // no node has joined: nothing to wait for
        assert_eq!(advance(dir, now).expect("advance"), Some(Stage::Reissue));
        let new_leaf = leaf(dir, now);
        let aborted = abort(dir).expect("abort");
        assert_eq!(aborted.new_root, state.new_root);
        assert!(!in_progress(dir));
        let s = signing(dir).expect("signing");
        assert_eq!(s.signing_root(), pki::fingerprint(&old));
        assert_eq!(s.roots, vec![old.clone()]);
        assert!(
            verifies(&[&old], &new_leaf),
            "through the cross-signed intermediate"
        );
        let none = abort(dir).expect_err("nothing to abort").to_string();
        assert!(none.contains("no root rotation"), "{none}");
    }
}
