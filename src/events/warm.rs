//! The opcache steps around a switch (`opcache.switch: warm`): before ApplicationStart's
//! rename, precompile the new release into each php-fpm pool and choose per pool whether a
//! reload is needed; after the node is ready, retire the old releases' scripts and schedule
//! a reclaiming reload when wasted memory passed the threshold.
//!
//! The choices are `crate::opcache`'s pure functions; this module reads the pools, performs
//! the choice and records it in the state (status shows it). A pool that cannot be read never
//! fails a deploy: it takes today's path (switch, then reload) and the log says why.

use std::path::PathBuf;
use std::time::SystemTime;

use tracing::{info, warn};

use crate::lifecycle;
use crate::opcache::{self, Addr, Plan, Pool, Snapshot, SwitchRecord};
use crate::services::{ServiceConfig, ServiceKind};

use super::{Engine, EngineError};

impl Engine {
    /// The php-fpm services with a FastCGI address, and their pools.
    fn fastcgi_pools(&self) -> Vec<(ServiceConfig, Pool)> {
        self.cfg
            .services
            .list
            .iter()
            .filter(|s| s.kind == ServiceKind::PhpFpm)
            .filter_map(|s| {
                let addr = Addr::parse(s.fastcgi.as_deref()?).ok()?;
                Some((s.clone(), Pool::new(addr, &self.cfg.opcache)))
            })
            .collect()
    }

    /// The spellings PHP may use for the releases directory: as configured and real.
    pub fn releases_dirs(&self) -> Vec<PathBuf> {
        let d = self.layout.releases_dir();
        let mut v = vec![d.clone()];
        if let Ok(real) = std::fs::canonicalize(&d)
            && real != d
        {
            v.push(real);
        }
        v
    }

    /// Before the switch to `id` (from `old`): per pool, read opcache, decide, reload first
    /// when needed, precompile. Returns the services that must NOT be reloaded after the
    /// switch (they hold the new release already). An error only when a reload before the
    /// switch failed: nothing has switched then.
    pub(super) async fn opcache_before_switch(
        &mut self,
        id: &str,
        old: Option<&str>,
    ) -> Result<Vec<String>, EngineError> {
        if self.cfg.opcache.switch == opcache::SwitchMode::Reload {
            return Ok(Vec::new());
        }
        let ocfg = self.cfg.opcache.clone();
        let dirs = self.releases_dirs();
        let new_root = dirs.last().cloned().unwrap_or_default().join(id);
        let old_roots: Vec<PathBuf> = old
            .map(|o| dirs.iter().map(|d| d.join(o)).collect())
            .unwrap_or_default();
        let mut no_reload = Vec::new();
        for (svc, pool) in self.fastcgi_pools() {
            let name = svc.name.clone();
            let mut rec = self.doc.opcache.get(&name).cloned().unwrap_or_default();
            rec.fastcgi = pool.addr.to_string();
            let status = pool.status(true).await;
            // The hot set: what the old release has cached, where it exists in the new one,
            // then the configured globs.
            let (files, need) = match &status {
                Ok(s) => {
                    let hot: Vec<(PathBuf, u64)> =
                        opcache::hot_set(&s.scripts, &old_roots, &new_root)
                            .into_iter()
                            .filter(|(p, _)| p.is_file())
                            .collect();
                    let mut files: Vec<PathBuf> = hot.iter().map(|(p, _)| p.clone()).collect();
                    let known: std::collections::HashSet<PathBuf> = files.iter().cloned().collect();
                    let extra: Vec<PathBuf> = opcache::glob_files(&new_root, &ocfg.globs)
                        .into_iter()
                        .filter(|p| !known.contains(p))
                        .collect();
                    let need = opcache::estimate_need(s, &hot, extra.len());
                    files.extend(extra);
                    (files, need)
                }
                Err(_) => (Vec::new(), opcache::Need::default()),
            };
            let err_text = status.as_ref().err().map(|e| e.to_string());
            let mut decision = opcache::decide(
                &ocfg,
                status
                    .as_ref()
                    .map_err(|_| err_text.as_deref().unwrap_or("")),
                need,
                rec.reclaim_due.as_deref(),
            );
            let mut reloaded = None;
            if decision.plan == Plan::ReloadThenWarm {
                info!(
                    "{name}: reloading php-fpm before the switch ({}), then precompiling releases/{id}",
                    decision.reason
                );
                crate::services::reload_service(&self.cfg.services, &name)
                    .await
                    .map_err(|e| {
                        EngineError::Failed(format!(
                            "{e}; nothing was switched, the current release keeps serving"
                        ))
                    })?;
                reloaded = Some("before_switch".to_string());
                rec.reclaim_due = None;
                let old_start = status.as_ref().map(|s| s.start_time).unwrap_or(0);
                if !pool.wait_fresh(old_start, ocfg.timeout).await {
                    warn!(
                        "{name}: php-fpm did not answer from a fresh opcache within {:?} of the reload; precompiling anyway",
                        ocfg.timeout
                    );
                }
            }
            let mut precompile = None;
            if decision.plan != Plan::ReloadAfterSwitch {
                match opcache::precompile(&pool, &files, ocfg.budget, ocfg.batch, ocfg.concurrency)
                    .await
                {
                    Ok(rep) => {
                        info!(
                            "{name}: precompiled releases/{id} into opcache: {}",
                            rep.summary()
                        );
                        for (f, m) in &rep.failures {
                            warn!("{name}: could not precompile {f}: {m}");
                        }
                        if rep.not_cached > 0 {
                            warn!(
                                "{name}: {} compiled file(s) were not kept: opcache is full, or they are younger than opcache.file_update_protection seconds",
                                rep.not_cached
                            );
                        }
                        let after = pool.status(true).await;
                        let redo = match &after {
                            Ok(a) => {
                                rec.snapshot = Some(Snapshot::of(a, &dirs, now()));
                                opcache::after_precompile(&ocfg, &rep, a)
                            }
                            Err(e) => Some(format!(
                                "the pool's opcache could not be read after the precompile ({e})"
                            )),
                        };
                        if let Some(why) = redo
                            && reloaded.is_none()
                        {
                            decision = opcache::Decision {
                                plan: Plan::ReloadAfterSwitch,
                                reason: why,
                            };
                        }
                        precompile = Some(rep);
                    }
                    Err(e) if reloaded.is_none() => {
                        decision = opcache::Decision {
                            plan: Plan::ReloadAfterSwitch,
                            reason: format!("the precompile failed ({e})"),
                        };
                    }
                    Err(e) => warn!(
                        "{name}: the precompile after the reload failed ({e}); the new release compiles on first request"
                    ),
                }
            }
            if decision.plan == Plan::ReloadAfterSwitch {
                info!("{name}: switch, then reload php-fpm: {}", decision.reason);
                reloaded = Some("after_switch".to_string());
            } else {
                if decision.plan == Plan::Warm {
                    info!(
                        "{name}: switching without a php-fpm reload: {}",
                        decision.reason
                    );
                }
                no_reload.push(name.clone());
            }
            rec.last_switch = Some(SwitchRecord {
                at: now(),
                release: id.to_string(),
                plan: Some(decision.plan),
                reason: decision.reason,
                precompile,
                reloaded,
            });
            self.doc.opcache.insert(name, rec);
        }
        self.persist()?;
        Ok(no_reload)
    }

    /// After the node is ready: invalidate the scripts of every release but the current one,
    /// read opcache again, and note a reclaim when wasted memory passed the threshold.
    /// Failures are warnings: the node is serving.
    pub(super) async fn opcache_after_ready(&mut self) {
        if self.cfg.opcache.switch == opcache::SwitchMode::Reload {
            return;
        }
        let Some(current) = self.layout.current() else {
            return;
        };
        let dirs = self.releases_dirs();
        for (svc, pool) in self.fastcgi_pools() {
            let name = svc.name.clone();
            let mut rec = self.doc.opcache.get(&name).cloned().unwrap_or_default();
            rec.fastcgi = pool.addr.to_string();
            let retired: Vec<PathBuf> = match pool.status(true).await {
                Ok(s) => s
                    .scripts
                    .iter()
                    .map(|c| PathBuf::from(c.path()))
                    .filter(|p| opcache::release_of(p, &dirs).is_some_and(|r| r != current))
                    .collect(),
                Err(e) => {
                    warn!("{name}: could not read opcache after the switch: {e}");
                    continue;
                }
            };
            if !retired.is_empty() {
                match pool.invalidate(&retired).await {
                    Ok(n) => info!("{name}: invalidated {n} cached script(s) of older releases"),
                    Err(e) => warn!("{name}: could not invalidate older releases' scripts: {e}"),
                }
            }
            match pool.status(true).await {
                Ok(s) => {
                    rec.reclaim_due = opcache::reclaim_due(&self.cfg.opcache, &s);
                    if let Some(r) = &rec.reclaim_due {
                        let when = match self.cfg.opcache.reclaim_at {
                            opcache::ReclaimAt::Window => "in the maintenance window",
                            _ => "in the next deploy before its switch",
                        };
                        info!("{name}: a reclaiming reload is due, {when}: {r}");
                    }
                    rec.snapshot = Some(Snapshot::of(&s, &dirs, now()));
                }
                Err(e) => warn!("{name}: could not read opcache: {e}"),
            }
            self.doc.opcache.insert(name, rec);
        }
        if let Err(e) = self.persist() {
            warn!("could not record the opcache state: {e}");
        }
    }
}

impl Engine {
    /// The pools whose opcache status shows, by service name (none with `switch: reload`).
    /// The daemon reads them without holding the engine, then records the snapshot.
    pub fn opcache_status_targets(&self) -> Vec<(String, Pool)> {
        if self.cfg.opcache.switch == opcache::SwitchMode::Reload {
            return Vec::new();
        }
        self.fastcgi_pools()
            .into_iter()
            .map(|(s, p)| (s.name, p))
            .collect()
    }

    /// Records a fresh snapshot of `name`'s opcache (status shows it).
    pub fn opcache_record_snapshot(&mut self, name: &str, fastcgi: String, snap: Snapshot) {
        let rec = self.doc.opcache.entry(name.to_string()).or_default();
        rec.fastcgi = fastcgi;
        rec.snapshot = Some(snap);
        if let Err(e) = self.persist() {
            warn!("could not record the opcache state: {e}");
        }
    }

    /// `opcache.reclaim_at: window`: inside the window and with no deployment in progress,
    /// each pool with a reclaim due is reloaded, then the current release's hot set (what it
    /// had cached) is precompiled into the fresh opcache at once, so the new workers start
    /// warm. The daemon calls this periodically.
    pub async fn opcache_reclaim_in_window(&mut self, minute_of_day: u32) {
        let ocfg = self.cfg.opcache.clone();
        if ocfg.switch == opcache::SwitchMode::Reload
            || ocfg.reclaim_at != opcache::ReclaimAt::Window
        {
            return;
        }
        let Some(window) = ocfg
            .reclaim_window
            .as_deref()
            .and_then(|w| opcache::parse_window(w).ok())
        else {
            return;
        };
        if !opcache::in_window(window, minute_of_day) {
            return;
        }
        if self
            .doc
            .deployment
            .as_ref()
            .is_some_and(|d| d.status == lifecycle::DeploymentStatus::InProgress)
        {
            return;
        }
        let Some(current) = self.layout.current() else {
            return;
        };
        let dirs = self.releases_dirs();
        let roots: Vec<PathBuf> = dirs.iter().map(|d| d.join(&current)).collect();
        let mut changed = false;
        for (svc, pool) in self.fastcgi_pools() {
            let name = svc.name.clone();
            let Some(mut rec) = self.doc.opcache.get(&name).cloned() else {
                continue;
            };
            let Some(why) = rec.reclaim_due.clone() else {
                continue;
            };
            let s = match pool.status(true).await {
                Ok(s) => s,
                Err(e) => {
                    warn!("{name}: the reclaim waits: opcache could not be read ({e})");
                    continue;
                }
            };
            let hot: Vec<PathBuf> = opcache::hot_set(&s.scripts, &roots, roots.last().unwrap())
                .into_iter()
                .map(|(p, _)| p)
                .collect();
            info!(
                "{name}: reclaiming opcache in the maintenance window ({why}): reloading php-fpm"
            );
            if let Err(e) = crate::services::reload_service(&self.cfg.services, &name).await {
                warn!("{name}: the reclaiming reload failed: {e}");
                continue;
            }
            if !pool.wait_fresh(s.start_time, ocfg.timeout).await {
                warn!(
                    "{name}: php-fpm did not answer from a fresh opcache within {:?}",
                    ocfg.timeout
                );
            }
            match opcache::precompile(&pool, &hot, ocfg.budget, ocfg.batch, ocfg.concurrency).await
            {
                Ok(rep) => info!(
                    "{name}: precompiled releases/{current} again: {}",
                    rep.summary()
                ),
                Err(e) => warn!("{name}: the precompile after the reclaiming reload failed: {e}"),
            }
            rec.reclaim_due = None;
            if let Ok(a) = pool.status(true).await {
                rec.snapshot = Some(Snapshot::of(&a, &dirs, now()));
            }
            self.doc.opcache.insert(name, rec);
            changed = true;
        }
        if changed && let Err(e) = self.persist() {
            warn!("could not record the opcache state: {e}");
        }
    }
}

pub fn now() -> String {
    lifecycle::timestamp(SystemTime::now())
}
