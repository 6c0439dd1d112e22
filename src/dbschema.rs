//! Magento's declarative schema: what a release's `etc/db_schema.xml` files declare, merged as
//! Magento merges them, and whether the change from the live release to a new one is one old
//! code can keep serving on (additive) or not (breaking).
//!
//! Old code keeps serving while `setup:upgrade` moves the shared database forward (env.php's
//! `deployment/blue_green/enabled` silences its version checks), so the question before the
//! upgrade is what that upgrade does to the tables old code reads and writes. Magento itself
//! answers "apply the new declaration"; this module answers "would old code still work".
//!
//! Merging follows Magento: every enabled module's `etc/db_schema.xml` (app/code/*/* and
//! vendor/*/*), in module load order (app/etc/config.php `modules`), merged per element by
//! the id attributes of app/etc/di.xml (`table@name`, `column@name`,
//! `constraint@referenceId`, `index@referenceId`): a later file's attributes win, an element
//! whose `xsi:type` changes is replaced whole (Magento\Framework\Config\Dom, used by
//! Setup/Declaration/Schema/FileSystem/XmlReader.php), and `disabled="true"` leaves an
//! element out (Setup/Declaration/Schema/Declaration/SchemaBuilder.php). setup:upgrade drops
//! a table, column or key that is no longer declared only when a module's
//! `etc/db_schema_whitelist.json` lists it; `onCreate="migrateDataFrom(old)"` renames a
//! column, `migrateDataFromAnotherTable(old)` a table.
//!
//! Parsing and classifying are pure ([`merge`], [`classify`]); [`read_release`] reads the
//! files through the release's directory handle, never following a link.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The class of a schema change, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Nothing old code uses changes.
    None,
    /// New tables, nullable or defaulted columns, indexes, wider types: old code keeps working.
    Additive,
    /// Something old code uses is dropped, renamed, narrowed or constrained.
    Breaking,
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Class::None => "none",
            Class::Additive => "additive",
            Class::Breaking => "breaking",
        })
    }
}

impl std::str::FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Class, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Class::None),
            "additive" => Ok(Class::Additive),
            "breaking" => Ok(Class::Breaking),
            other => Err(format!(
                "`{other}` is not a schema change class (additive, breaking or none)"
            )),
        }
    }
}

/// One reason for the class: an element (`table` or `table.column` / `table.KEY_ID`), what
/// changes, and the file that declares it (the new release's, or the live one's for a removal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub class: Class,
    pub element: String,
    pub what: String,
    pub file: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}: {} ({})",
            self.class, self.element, self.what, self.file
        )
    }
}

/// The files of one module, as read from a release (paths relative to the release root).
#[derive(Debug, Clone, Default)]
pub struct ModuleFiles {
    pub name: String,
    /// The module directory, e.g. app/code/Vendor/Shop.
    pub dir: String,
    pub db_schema: Option<String>,
    pub whitelist: Option<String>,
}

/// A declared element: its attributes, its child `<column name>` list (keys and indexes), the
/// file that last declared it.
#[derive(Debug, Clone, PartialEq)]
struct Element {
    attrs: BTreeMap<String, String>,
    columns: Vec<String>,
    file: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Table {
    attrs: BTreeMap<String, String>,
    file: String,
    column: BTreeMap<String, Element>,
    constraint: BTreeMap<String, Element>,
    index: BTreeMap<String, Element>,
}

/// What setup:upgrade may drop: table -> element names (columns, keys, indexes), with the file.
type Whitelist = BTreeMap<String, BTreeMap<String, String>>;

/// A release's merged declaration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Schema {
    tables: BTreeMap<String, Table>,
    whitelist: Whitelist,
    /// Modules that could not be read (a symlinked module directory): the analysis cannot
    /// vouch for them.
    pub unreadable: Vec<(String, String)>,
}

impl Schema {
    pub fn table_count(&self) -> usize {
        self.tables.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbSchemaError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn is_true(v: Option<&String>) -> bool {
    v.is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1"))
}

/// Merges the modules' files, in the given (load) order. Pure.
pub fn merge(modules: &[ModuleFiles]) -> Result<Schema, DbSchemaError> {
    let mut s = Schema::default();
    for m in modules {
        if let Some(text) = &m.db_schema {
            let file = format!("{}/etc/db_schema.xml", m.dir);
            merge_file(&mut s.tables, &file, text)?;
        }
        if let Some(text) = &m.whitelist {
            let file = format!("{}/etc/db_schema_whitelist.json", m.dir);
            let w: BTreeMap<String, BTreeMap<String, BTreeMap<String, serde_json::Value>>> =
                serde_json::from_str(text).map_err(|e| DbSchemaError::Parse {
                    file: file.clone(),
                    message: format!("not a db_schema_whitelist.json ({e})"),
                })?;
            for (table, kinds) in w {
                let t = s.whitelist.entry(table).or_default();
                for names in kinds.into_values() {
                    for name in names.into_keys() {
                        t.insert(name, file.clone());
                    }
                }
            }
        }
    }
    // SchemaBuilder leaves disabled elements out of the declaration.
    s.tables.retain(|_, t| !is_true(t.attrs.get("disabled")));
    for t in s.tables.values_mut() {
        for kind in [&mut t.column, &mut t.constraint, &mut t.index] {
            kind.retain(|_, e| !is_true(e.attrs.get("disabled")));
        }
    }
    Ok(s)
}

fn merge_file(
    tables: &mut BTreeMap<String, Table>,
    file: &str,
    text: &str,
) -> Result<(), DbSchemaError> {
    let doc = roxmltree::Document::parse(text).map_err(|e| DbSchemaError::Parse {
        file: file.into(),
        message: format!("not well-formed XML: {e}"),
    })?;
    let root = doc.root_element();
    if root.tag_name().name() != "schema" {
        return Err(DbSchemaError::Parse {
            file: file.into(),
            message: format!(
                "the root element is <{}>, not <schema>",
                root.tag_name().name()
            ),
        });
    }
    let attrs = |n: roxmltree::Node| -> BTreeMap<String, String> {
        n.attributes()
            .map(|a| {
                // xsi:type keeps its prefix, as Magento's merger keys on it
                let name = match a.namespace() {
                    Some(ns) if ns.ends_with("XMLSchema-instance") => format!("xsi:{}", a.name()),
                    _ => a.name().to_string(),
                };
                (name, a.value().to_string())
            })
            .collect()
    };
    for t in root.children().filter(|n| n.has_tag_name("table")) {
        let Some(name) = t.attribute("name") else {
            return Err(DbSchemaError::Parse {
                file: file.into(),
                message: format!(
                    "line {}: <table> without a name",
                    doc.text_pos_at(t.range().start).row
                ),
            });
        };
        let table = tables.entry(name.to_string()).or_default();
        table.attrs.extend(attrs(t));
        if table.file.is_empty() {
            table.file = file.into();
        }
        for c in t.children().filter(|n| n.is_element()) {
            let kind = c.tag_name().name();
            let (map, id_attr) = match kind {
                "column" => (&mut table.column, "name"),
                "constraint" => (&mut table.constraint, "referenceId"),
                "index" => (&mut table.index, "referenceId"),
                _ => continue,
            };
            let Some(id) = c.attribute(id_attr) else {
                return Err(DbSchemaError::Parse {
                    file: file.into(),
                    message: format!(
                        "line {}: <{kind}> in table {name} without {id_attr}",
                        doc.text_pos_at(c.range().start).row
                    ),
                });
            };
            let mut a = attrs(c);
            let mut cols: Vec<String> = c
                .children()
                .filter(|n| n.has_tag_name("column"))
                .filter_map(|n| n.attribute("name").map(str::to_string))
                .collect();
            if let Some(old) = map.get(id) {
                let same_type = a
                    .get("xsi:type")
                    .is_none_or(|t| old.attrs.get("xsi:type") == Some(t));
                if same_type {
                    let mut merged = old.attrs.clone();
                    merged.extend(a);
                    a = merged;
                    let mut all = old.columns.clone();
                    for col in cols {
                        if !all.contains(&col) {
                            all.push(col);
                        }
                    }
                    cols = all;
                }
            }
            map.insert(
                id.to_string(),
                Element {
                    attrs: a,
                    columns: cols,
                    file: file.into(),
                },
            );
        }
    }
    Ok(())
}

/// A column's type in comparable terms: family, and a rank within it (bigger holds more).
#[derive(Debug, PartialEq)]
struct ColType {
    family: &'static str,
    /// Integer byte width / text size class / varchar length / decimal (precision, scale).
    size: (i64, i64),
    unsigned: bool,
}

fn col_type(e: &Element) -> ColType {
    let a = &e.attrs;
    let t = a.get("xsi:type").map(String::as_str).unwrap_or("varchar");
    let num = |k: &str, d: i64| a.get(k).and_then(|v| v.trim().parse().ok()).unwrap_or(d);
    let unsigned = is_true(a.get("unsigned"));
    let (family, size) = match t {
        "boolean" => ("int", (1, 0)),
        "tinyint" => ("int", (1, 0)),
        "smallint" => ("int", (2, 0)),
        "int" => ("int", (4, 0)),
        "bigint" => ("int", (8, 0)),
        // varchar(n) < text < mediumtext < longtext: text holds 65535 bytes
        "varchar" => ("text", (num("length", 255), 0)),
        "text" => ("text", (65_535, 0)),
        "mediumtext" => ("text", (16_777_215, 0)),
        "longtext" => ("text", (4_294_967_295, 0)),
        "varbinary" => ("blob", (num("length", 255), 0)),
        "blob" => ("blob", (65_535, 0)),
        "mediumblob" => ("blob", (16_777_215, 0)),
        "longblob" => ("blob", (4_294_967_295, 0)),
        "decimal" => ("decimal", (num("precision", 10), num("scale", 0))),
        "float" => ("real", (4, 0)),
        "double" => ("real", (8, 0)),
        "date" => ("date", (1, 0)),
        "datetime" | "timestamp" => ("datetime", (2, 0)),
        "json" => ("text", (4_294_967_295, 0)),
        _ => ("other", (0, 0)),
    };
    ColType {
        family,
        size,
        unsigned,
    }
}

fn type_text(e: &Element) -> String {
    let a = &e.attrs;
    let t = a
        .get("xsi:type")
        .cloned()
        .unwrap_or_else(|| "varchar".into());
    let mut s = t.clone();
    match t.as_str() {
        "varchar" | "varbinary" => s += &format!("({})", a.get("length").map_or("255", |v| v)),
        "decimal" => {
            s += &format!(
                "({},{})",
                a.get("precision").map_or("10", |v| v),
                a.get("scale").map_or("0", |v| v)
            )
        }
        _ => {}
    }
    if is_true(a.get("unsigned")) {
        s += " unsigned";
    }
    s
}

/// How the type changes: None (same), Some(true) wider, Some(false) narrower or incompatible.
fn widens(old: &Element, new: &Element) -> Option<bool> {
    let (o, n) = (col_type(old), col_type(new));
    if o == n {
        return None;
    }
    if o.family != n.family || o.family == "other" {
        return Some(false);
    }
    if o.family == "int" {
        // unsigned -> signed of the same width halves the range; signed -> unsigned loses negatives
        if o.unsigned != n.unsigned {
            return Some(!n.unsigned && n.size.0 > o.size.0);
        }
        return Some(n.size.0 >= o.size.0);
    }
    if o.family == "decimal" {
        let int_digits = |s: (i64, i64)| s.0 - s.1;
        return Some(
            int_digits(n.size) >= int_digits(o.size)
                && n.size.1 >= o.size.1
                && (o.unsigned || !n.unsigned),
        );
    }
    Some(n.size >= o.size && (o.unsigned || !n.unsigned))
}

fn nullable(e: &Element) -> bool {
    !is_true(e.attrs.get("identity"))
        && !matches!(
            e.attrs.get("nullable").map(|v| v.trim().to_ascii_lowercase()),
            Some(v) if v == "false" || v == "0"
        )
}

fn migrated_from<'a>(e: &'a Element, func: &str) -> Option<&'a str> {
    let v = e.attrs.get("onCreate")?.trim();
    v.strip_prefix(func)?
        .strip_prefix('(')?
        .strip_suffix(')')
        .map(str::trim)
}

/// Classifies the change from `old` (the live release) to `new`. Pure.
pub fn classify(old: &Schema, new: &Schema) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut key_findings = Vec::new();
    let mut push = |class, element: String, what: String, file: &str| {
        out.push(Finding {
            class,
            element,
            what,
            file: file.to_string(),
        })
    };
    for (m, dir) in &new.unreadable {
        push(
            Class::Breaking,
            m.clone(),
            format!(
                "module directory {dir} is a symlink and was not analysed; declare the release's class if it is safe"
            ),
            dir,
        );
    }
    let renamed_tables: BTreeMap<&str, &str> = new
        .tables
        .iter()
        .filter_map(|(n, t)| {
            let e = Element {
                attrs: t.attrs.clone(),
                columns: vec![],
                file: t.file.clone(),
            };
            migrated_from(&e, "migrateDataFromAnotherTable")
                .map(|from| (from.to_string(), n.as_str()))
        })
        .map(|(from, to)| {
            (
                old.tables
                    .get_key_value(&from)
                    .map_or("", |(k, _)| k.as_str()),
                to,
            )
        })
        .filter(|(from, _)| !from.is_empty())
        .collect();
    let dropped_by_upgrade =
        |table: &str, el: &str| new.whitelist.get(table).is_some_and(|w| w.contains_key(el));
    for (name, ot) in &old.tables {
        let Some(nt) = new.tables.get(name) else {
            if let Some(to) = renamed_tables.get(name.as_str()) {
                push(
                    Class::Breaking,
                    name.clone(),
                    format!(
                        "table renamed to {to} (onCreate migrateDataFromAnotherTable): old code still uses {name}"
                    ),
                    &new.tables[*to].file,
                );
            } else if new.whitelist.contains_key(name) {
                push(
                    Class::Breaking,
                    name.clone(),
                    "table dropped: no longer declared, and db_schema_whitelist.json lets setup:upgrade drop it; old code still uses it".into(),
                    &ot.file,
                );
            } else {
                push(
                    Class::Additive,
                    name.clone(),
                    "table no longer declared; setup:upgrade keeps it (not in db_schema_whitelist.json)".into(),
                    &ot.file,
                );
            }
            continue;
        };
        let renamed_cols: BTreeMap<&str, &str> = nt
            .column
            .iter()
            .filter(|(n, _)| !ot.column.contains_key(*n))
            .filter_map(|(n, c)| migrated_from(c, "migrateDataFrom").map(|f| (f, n.as_str())))
            .collect();
        for (cn, oc) in &ot.column {
            let el = format!("{name}.{cn}");
            let Some(nc) = nt.column.get(cn) else {
                if let Some(to) = renamed_cols.get(cn.as_str()) {
                    push(
                        Class::Breaking,
                        el,
                        format!(
                            "column renamed to {to} (onCreate migrateDataFrom): old code still uses {cn}"
                        ),
                        &nt.column[*to].file,
                    );
                } else if dropped_by_upgrade(name, cn) {
                    push(
                        Class::Breaking,
                        el,
                        "column dropped: no longer declared, and db_schema_whitelist.json lets setup:upgrade drop it; old code still uses it".into(),
                        &oc.file,
                    );
                } else {
                    push(
                        Class::Additive,
                        el,
                        "column no longer declared; setup:upgrade keeps it (not in db_schema_whitelist.json)".into(),
                        &oc.file,
                    );
                }
                continue;
            };
            match widens(oc, nc) {
                Some(true) => push(
                    Class::Additive,
                    el.clone(),
                    format!("type widened from {} to {}", type_text(oc), type_text(nc)),
                    &nc.file,
                ),
                Some(false) => push(
                    Class::Breaking,
                    el.clone(),
                    format!(
                        "type narrowed or changed from {} to {}: old code's values may not fit",
                        type_text(oc),
                        type_text(nc)
                    ),
                    &nc.file,
                ),
                None => {}
            }
            match (nullable(oc), nullable(nc), nc.attrs.get("default")) {
                (true, false, None) => push(
                    Class::Breaking,
                    el.clone(),
                    "NOT NULL added without a default: old code that leaves it out or writes NULL fails".into(),
                    &nc.file,
                ),
                (true, false, Some(d)) => push(
                    Class::Additive,
                    el.clone(),
                    format!("NOT NULL added with default {d}"),
                    &nc.file,
                ),
                (false, true, _) => push(
                    Class::Additive,
                    el.clone(),
                    "now nullable".into(),
                    &nc.file,
                ),
                _ => {}
            }
            if is_true(oc.attrs.get("identity")) != is_true(nc.attrs.get("identity")) {
                push(
                    Class::Breaking,
                    el.clone(),
                    "identity (auto increment) changed".into(),
                    &nc.file,
                );
            }
        }
        for (cn, nc) in &nt.column {
            if ot.column.contains_key(cn) || renamed_cols.values().any(|to| to == cn) {
                continue;
            }
            let el = format!("{name}.{cn}");
            if nullable(nc) || nc.attrs.contains_key("default") || is_true(nc.attrs.get("identity"))
            {
                push(
                    Class::Additive,
                    el,
                    format!(
                        "new column ({}, {})",
                        type_text(nc),
                        if nullable(nc) {
                            "nullable".to_string()
                        } else {
                            format!(
                                "default {}",
                                nc.attrs.get("default").map_or("auto increment", |v| v)
                            )
                        }
                    ),
                    &nc.file,
                );
            } else {
                push(
                    Class::Breaking,
                    el,
                    format!(
                        "new NOT NULL column without a default ({}): old code's INSERTs leave it out and fail",
                        type_text(nc)
                    ),
                    &nc.file,
                );
            }
        }
        keys(name, ot, nt, &mut key_findings);
    }
    out.append(&mut key_findings);
    for (name, nt) in &new.tables {
        if !old.tables.contains_key(name) && !renamed_tables.values().any(|to| to == name) {
            out.push(Finding {
                class: Class::Additive,
                element: name.clone(),
                what: format!("new table ({} columns)", nt.column.len()),
                file: nt.file.clone(),
            });
        }
    }
    // Removing a whitelist entry that the live release's declaration still uses.
    for (table, entries) in &old.whitelist {
        let Some(ot) = old.tables.get(table) else {
            continue;
        };
        for (el, file) in entries {
            let used = ot.column.contains_key(el)
                || ot.constraint.contains_key(el)
                || ot.index.contains_key(el);
            let kept = new.whitelist.get(table).is_some_and(|w| w.contains_key(el));
            if used && !kept {
                out.push(Finding {
                    class: Class::Breaking,
                    element: format!("{table}.{el}"),
                    what:
                        "removed from db_schema_whitelist.json while the live release still uses it"
                            .into(),
                    file: file.clone(),
                });
            }
        }
    }
    out
}

/// Keys and indexes of a table present in both releases.
fn keys(name: &str, ot: &Table, nt: &Table, out: &mut Vec<Finding>) {
    let kind = |e: &Element| e.attrs.get("xsi:type").cloned().unwrap_or_default();
    for (id, nk) in &nt.constraint {
        let el = format!("{name}.{id}");
        let existed_cols = nk.columns.iter().any(|c| ot.column.contains_key(c));
        let before = ot.constraint.get(id);
        let changed = before.is_none_or(|o| o.columns != nk.columns || kind(o) != kind(nk));
        if !changed {
            continue;
        }
        let (class, what) = match kind(nk).as_str() {
            "unique" if existed_cols => (
                Class::Breaking,
                format!(
                    "unique constraint on ({}) added to existing data: setup:upgrade fails on duplicates, and old code's writes may violate it",
                    nk.columns.join(", ")
                ),
            ),
            "unique" => (
                Class::Additive,
                format!(
                    "unique constraint on new columns ({})",
                    nk.columns.join(", ")
                ),
            ),
            "primary" => (
                Class::Breaking,
                format!("primary key changed to ({})", nk.columns.join(", ")),
            ),
            "foreign"
                if existed_cols
                    || ot
                        .column
                        .contains_key(nk.attrs.get("column").map_or("", |c| c)) =>
            {
                (
                    Class::Breaking,
                    format!(
                        "foreign key added to existing data ({} -> {}.{}): old code's writes may violate it",
                        nk.attrs.get("column").map_or("?", |c| c),
                        nk.attrs.get("referenceTable").map_or("?", |c| c),
                        nk.attrs.get("referenceColumn").map_or("?", |c| c)
                    ),
                )
            }
            other => (Class::Additive, format!("new {other} constraint")),
        };
        out.push(Finding {
            class,
            element: el,
            what,
            file: nk.file.clone(),
        });
    }
    for (id, ok) in &ot.constraint {
        if !nt.constraint.contains_key(id) {
            out.push(Finding {
                class: Class::Additive,
                element: format!("{name}.{id}"),
                what: format!("{} constraint removed", kind(ok)),
                file: ok.file.clone(),
            });
        }
    }
    for (id, ni) in &nt.index {
        match ot.index.get(id) {
            None => out.push(Finding {
                class: Class::Additive,
                element: format!("{name}.{id}"),
                what: format!("new index on ({})", ni.columns.join(", ")),
                file: ni.file.clone(),
            }),
            Some(oi) if oi.columns != ni.columns => out.push(Finding {
                class: Class::Additive,
                element: format!("{name}.{id}"),
                what: format!("index now on ({})", ni.columns.join(", ")),
                file: ni.file.clone(),
            }),
            _ => {}
        }
    }
    for (id, oi) in &ot.index {
        if !nt.index.contains_key(id) {
            out.push(Finding {
                class: Class::Additive,
                element: format!("{name}.{id}"),
                what: "index removed".into(),
                file: oi.file.clone(),
            });
        }
    }
}

/// The class of a set of findings: the worst one.
pub fn overall(findings: &[Finding]) -> Class {
    findings
        .iter()
        .map(|f| f.class)
        .max()
        .unwrap_or(Class::None)
}

/// The modules app/etc/config.php lists in its `modules` array (name => 0|1), in Magento's
/// load order, each with whether it is enabled.
pub fn module_list(config_php: &str) -> Vec<(String, bool)> {
    let Some(start) = config_php
        .find("'modules'")
        .or_else(|| config_php.find("\"modules\""))
    else {
        return Vec::new();
    };
    let rest = &config_php[start + 9..];
    let Some(open) = rest.find(['[', '(']) else {
        return Vec::new();
    };
    let body = &rest[open + 1..];
    let end = body.find([']', ')']).unwrap_or(body.len());
    body[..end]
        .split(',')
        .filter_map(|entry| {
            let (k, v) = entry.split_once("=>")?;
            let k = k.trim().trim_matches(['\'', '"']);
            let on = v.trim().trim_matches(['\'', '"']);
            (!k.is_empty()).then(|| (k.to_string(), on != "0" && on != "false"))
        })
        .collect()
}

/// The module name declared by a module.xml.
fn module_name(text: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(text).ok()?;
    doc.descendants()
        .find(|n| n.has_tag_name("module"))
        .and_then(|n| n.attribute("name"))
        .map(str::to_string)
}

const MAX_FILE: u64 = 8 << 20;

/// Reads a release's modules through its directory handle: app/code/*/* and vendor/*/*,
/// each with etc/module.xml, in load order (disabled modules left out, unlisted ones last,
/// by path). A symlinked module directory is not followed: it is listed as unreadable.
pub fn read_release(root: BorrowedFd<'_>, shown: &Path) -> Result<Schema, DbSchemaError> {
    let read = |rel: &Path| -> Result<Option<String>, DbSchemaError> {
        crate::appdir::read_beneath(root, rel, MAX_FILE)
            .map(|o| o.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .map_err(|source| DbSchemaError::Read {
                path: shown.join(rel),
                source,
            })
    };
    let mut found: Vec<ModuleFiles> = Vec::new();
    let mut unreadable = Vec::new();
    for top in ["app/code", "vendor"] {
        for (vendor, vlink) in
            crate::appdir::list_dirs_beneath(root, Path::new(top)).map_err(|source| {
                DbSchemaError::Read {
                    path: shown.join(top),
                    source,
                }
            })?
        {
            if vlink {
                unreadable.push((format!("{top}/{vendor}"), format!("{top}/{vendor}")));
                continue;
            }
            let vdir = Path::new(top).join(&vendor);
            for (module, mlink) in
                crate::appdir::list_dirs_beneath(root, &vdir).map_err(|source| {
                    DbSchemaError::Read {
                        path: shown.join(&vdir),
                        source,
                    }
                })?
            {
                let mdir = vdir.join(&module);
                if mlink {
                    unreadable.push((mdir.display().to_string(), mdir.display().to_string()));
                    continue;
                }
                let Some(xml) = read(&mdir.join("etc/module.xml"))? else {
                    continue;
                };
                let Some(name) = module_name(&xml) else {
                    return Err(DbSchemaError::Parse {
                        file: mdir.join("etc/module.xml").display().to_string(),
                        message: "no <module name=...>".into(),
                    });
                };
                found.push(ModuleFiles {
                    name,
                    dir: mdir.display().to_string(),
                    db_schema: read(&mdir.join("etc/db_schema.xml"))?,
                    whitelist: read(&mdir.join("etc/db_schema_whitelist.json"))?,
                });
            }
        }
    }
    let order = read(Path::new("app/etc/config.php"))?
        .map(|t| module_list(&t))
        .unwrap_or_default();
    let ordered = order_modules(found, &order);
    let mut s = merge(&ordered)?;
    // A symlinked vendor directory matters only if it holds a schema we cannot see: report it.
    s.unreadable = unreadable;
    Ok(s)
}

/// Load order: config.php's order; modules it disables are left out; modules it does not
/// list (no config.php yet) follow, by directory. Pure.
pub fn order_modules(mut found: Vec<ModuleFiles>, list: &[(String, bool)]) -> Vec<ModuleFiles> {
    found.sort_by(|a, b| a.dir.cmp(&b.dir));
    let listed: BTreeSet<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    let mut out: Vec<ModuleFiles> = list
        .iter()
        .filter(|(_, on)| *on)
        .filter_map(|(n, _)| found.iter().find(|m| &m.name == n).cloned())
        .collect();
    out.extend(
        found
            .iter()
            .filter(|m| !listed.contains(m.name.as_str()))
            .cloned(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = r#"<?xml version="1.0"?>
<schema xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="urn:magento:framework:Setup/Declaration/Schema/etc/schema.xsd">"#;

    fn module(name: &str, dir: &str, body: &str, whitelist: Option<&str>) -> ModuleFiles {
        ModuleFiles {
            name: name.into(),
            dir: dir.into(),
            db_schema: Some(format!("{HEAD}\n{body}\n</schema>\n")),
            whitelist: whitelist.map(str::to_string),
        }
    }

    const PRODUCT: &str = r#"
    <table name="shop_product" resource="default" engine="innodb">
        <column xsi:type="int" name="entity_id" unsigned="true" nullable="false" identity="true"/>
        <column xsi:type="varchar" name="sku" nullable="false" length="64"/>
        <column xsi:type="varchar" name="name" nullable="true" length="255"/>
        <column xsi:type="decimal" name="price" precision="12" scale="4" nullable="false" default="0"/>
        <column xsi:type="smallint" name="qty" unsigned="true" nullable="false" default="0"/>
        <constraint xsi:type="primary" referenceId="PRIMARY"><column name="entity_id"/></constraint>
        <index referenceId="SHOP_PRODUCT_NAME" indexType="btree"><column name="name"/></index>
    </table>"#;

    const WL: &str = r#"{"shop_product": {"column": {"entity_id": true, "sku": true, "name": true, "price": true, "qty": true},
        "index": {"SHOP_PRODUCT_NAME": true}, "constraint": {"PRIMARY": true}}}"#;

    const DIR: &str = "app/code/Vendor/Shop";
    const FILE: &str = "app/code/Vendor/Shop/etc/db_schema.xml";

    fn old() -> Schema {
        merge(&[module("Vendor_Shop", DIR, PRODUCT, Some(WL))]).unwrap()
    }

    /// The change from PRODUCT to PRODUCT with `from` replaced by `to` (and extra tables).
    fn change(from: &str, to: &str) -> Vec<Finding> {
        change_wl(from, to, WL)
    }

    fn change_wl(from: &str, to: &str, wl: &str) -> Vec<Finding> {
        assert!(from.is_empty() || PRODUCT.contains(from), "{from}");
        let body = if from.is_empty() {
            format!("{PRODUCT}{to}")
        } else {
            PRODUCT.replace(from, to)
        };
        let new = merge(&[module("Vendor_Shop", DIR, &body, Some(wl))]).unwrap();
        classify(&old(), &new)
    }

    fn only(f: &[Finding]) -> &Finding {
        assert_eq!(f.len(), 1, "{f:#?}");
        &f[0]
    }

    #[test]
    fn the_same_schema_is_no_change() {
        assert_eq!(classify(&old(), &old()), vec![]);
        assert_eq!(overall(&[]), Class::None);
    }

    #[test]
    fn additive_a_new_table() {
        let f = change(
            "",
            r#"<table name="shop_review"><column xsi:type="int" name="review_id" identity="true" nullable="false"/></table>"#,
        );
        let f = only(&f);
        assert_eq!(
            (f.class, f.element.as_str(), f.file.as_str()),
            (Class::Additive, "shop_review", FILE)
        );
    }

    #[test]
    fn additive_a_new_nullable_column_or_one_with_a_default() {
        let f = change(
            r#"<constraint xsi:type="primary""#,
            r#"<column xsi:type="varchar" name="subtitle" nullable="true" length="255"/>
               <column xsi:type="int" name="rank" nullable="false" default="0"/>
               <constraint xsi:type="primary""#,
        );
        assert_eq!(f.len(), 2, "{f:#?}");
        assert!(f.iter().all(|f| f.class == Class::Additive), "{f:#?}");
        assert_eq!(f[0].element, "shop_product.rank");
        assert_eq!(f[1].element, "shop_product.subtitle");
        assert_eq!(f[1].file, FILE);
    }

    #[test]
    fn additive_a_new_index() {
        let f = change(
            r#"<index referenceId="SHOP_PRODUCT_NAME""#,
            r#"<index referenceId="SHOP_PRODUCT_SKU_IDX" indexType="btree"><column name="sku"/></index>
               <index referenceId="SHOP_PRODUCT_NAME""#,
        );
        let f = only(&f);
        assert_eq!(
            (f.class, f.element.as_str()),
            (Class::Additive, "shop_product.SHOP_PRODUCT_SKU_IDX")
        );
    }

    #[test]
    fn additive_wider_types() {
        let f = change(
            r#"name="sku" nullable="false" length="64""#,
            r#"name="sku" nullable="false" length="128""#,
        );
        assert_eq!(only(&f).class, Class::Additive, "{f:#?}");
        let f = change(
            r#"xsi:type="smallint" name="qty""#,
            r#"xsi:type="int" name="qty""#,
        );
        assert_eq!(only(&f).class, Class::Additive, "{f:#?}");
        let f = change(
            r#"xsi:type="varchar" name="name" nullable="true" length="255""#,
            r#"xsi:type="text" name="name" nullable="true""#,
        );
        assert_eq!(only(&f).class, Class::Additive, "{f:#?}");
        let f = change(r#"precision="12" scale="4""#, r#"precision="14" scale="4""#);
        assert_eq!(only(&f).class, Class::Additive, "{f:#?}");
    }

    #[test]
    fn breaking_a_dropped_table() {
        let new = merge(&[module("Vendor_Shop", DIR, "", Some(WL))]).unwrap();
        let f = classify(&old(), &new);
        let f = only(&f);
        assert_eq!(
            (f.class, f.element.as_str(), f.file.as_str()),
            (Class::Breaking, "shop_product", FILE)
        );
        assert!(f.what.contains("table dropped"), "{f}");
    }

    #[test]
    fn breaking_a_renamed_table() {
        let renamed = PRODUCT.replace(
            r#"<table name="shop_product" resource="default" engine="innodb">"#,
            r#"<table name="shop_item" onCreate="migrateDataFromAnotherTable(shop_product)">"#,
        );
        let new = merge(&[module("Vendor_Shop", DIR, &renamed, Some(WL))]).unwrap();
        let f = classify(&old(), &new);
        let f = only(&f);
        assert_eq!(
            (f.class, f.element.as_str()),
            (Class::Breaking, "shop_product")
        );
        assert!(f.what.contains("renamed to shop_item"), "{f}");
    }

    #[test]
    fn breaking_a_dropped_column() {
        let f = change(
            r#"<column xsi:type="decimal" name="price" precision="12" scale="4" nullable="false" default="0"/>"#,
            "",
        );
        let f = only(&f);
        assert_eq!(
            (f.class, f.element.as_str(), f.file.as_str()),
            (Class::Breaking, "shop_product.price", FILE)
        );
        assert!(f.what.contains("column dropped"), "{f}");
    }

    #[test]
    fn breaking_a_renamed_column() {
        let f = change(
            r#"name="price" precision="12" scale="4" nullable="false" default="0""#,
            r#"name="base_price" precision="12" scale="4" nullable="false" default="0" onCreate="migrateDataFrom(price)""#,
        );
        let f = only(&f);
        assert_eq!(
            (f.class, f.element.as_str()),
            (Class::Breaking, "shop_product.price")
        );
        assert!(f.what.contains("renamed to base_price"), "{f}");
    }

    #[test]
    fn breaking_narrowed_types() {
        for (from, to) in [
            (
                r#"name="sku" nullable="false" length="64""#,
                r#"name="sku" nullable="false" length="32""#,
            ),
            (
                r#"xsi:type="smallint" name="qty""#,
                r#"xsi:type="tinyint" name="qty""#,
            ),
            (r#"precision="12" scale="4""#, r#"precision="12" scale="2""#),
            (
                r#"xsi:type="varchar" name="name" nullable="true" length="255""#,
                r#"xsi:type="int" name="name" nullable="true""#,
            ),
        ] {
            let f = change(from, to);
            let f = only(&f);
            assert_eq!(f.class, Class::Breaking, "{from} -> {to}: {f}");
            assert!(f.what.contains("narrowed"), "{f}");
        }
    }

    #[test]
    fn breaking_not_null_added_without_a_default() {
        // on an existing column
        let f = change(
            r#"name="name" nullable="true" length="255""#,
            r#"name="name" nullable="false" length="255""#,
        );
        let f = only(&f);
        assert_eq!(
            (f.class, f.element.as_str()),
            (Class::Breaking, "shop_product.name")
        );
        // as a new column
        let f = change(
            r#"<constraint xsi:type="primary""#,
            r#"<column xsi:type="int" name="stock" nullable="false"/><constraint xsi:type="primary""#,
        );
        let f = only(&f);
        assert_eq!(
            (f.class, f.element.as_str()),
            (Class::Breaking, "shop_product.stock")
        );
        assert!(f.what.contains("without a default"), "{f}");
    }

    #[test]
    fn breaking_a_unique_constraint_added_to_existing_data() {
        let f = change(
            r#"<index referenceId="SHOP_PRODUCT_NAME""#,
            r#"<constraint xsi:type="unique" referenceId="SHOP_PRODUCT_SKU"><column name="sku"/></constraint>
               <index referenceId="SHOP_PRODUCT_NAME""#,
        );
        let f = only(&f);
        assert_eq!(
            (f.class, f.element.as_str()),
            (Class::Breaking, "shop_product.SHOP_PRODUCT_SKU")
        );
        assert!(f.what.contains("unique constraint"), "{f}");
    }

    #[test]
    fn breaking_a_whitelist_entry_removed_that_old_code_still_uses() {
        let wl = WL.replace(r#""qty": true"#, r#""other": true"#);
        let f = change_wl("", "", &wl);
        let f = only(&f);
        assert_eq!(
            (f.class, f.element.as_str(), f.file.as_str()),
            (
                Class::Breaking,
                "shop_product.qty",
                "app/code/Vendor/Shop/etc/db_schema_whitelist.json"
            )
        );
    }

    #[test]
    fn a_column_no_longer_declared_and_not_whitelisted_is_kept_by_setup_upgrade() {
        let wl = WL.replace(r#""price": true, "#, "");
        let old = merge(&[module("Vendor_Shop", DIR, PRODUCT, Some(&wl))]).unwrap();
        let new = merge(&[module(
            "Vendor_Shop",
            DIR,
            &PRODUCT.replace(r#"<column xsi:type="decimal" name="price" precision="12" scale="4" nullable="false" default="0"/>"#, ""),
            Some(&wl),
        )])
        .unwrap();
        let f = classify(&old, &new);
        assert_eq!(only(&f).class, Class::Additive, "{f:#?}");
    }

    #[test]
    fn modules_merge_per_table_in_load_order_and_disabled_elements_drop_out() {
        // Module B extends A's table and overrides a column; then disables one.
        let a = module("Vendor_A", "app/code/Vendor/A", PRODUCT, None);
        let b = module(
            "Vendor_B",
            "vendor/acme/module-b",
            r#"<table name="shop_product">
                 <column xsi:type="varchar" name="sku" length="128"/>
                 <column xsi:type="int" name="extra" nullable="true"/>
               </table>"#,
            None,
        );
        let s = merge(&[a.clone(), b.clone()]).unwrap();
        let t = &s.tables["shop_product"];
        assert_eq!(t.column["sku"].attrs["length"], "128");
        assert_eq!(
            t.column["sku"].attrs["nullable"], "false",
            "attributes merge"
        );
        assert_eq!(
            t.column["sku"].file,
            "vendor/acme/module-b/etc/db_schema.xml"
        );
        assert!(t.column.contains_key("extra"));
        // the other order: A's length wins
        let s = merge(&[b, a.clone()]).unwrap();
        assert_eq!(s.tables["shop_product"].column["sku"].attrs["length"], "64");
        // disabled
        let c = module(
            "Vendor_C",
            "app/code/Vendor/C",
            r#"<table name="shop_product"><column name="qty" disabled="true"/></table>"#,
            None,
        );
        let s = merge(&[a, c]).unwrap();
        assert!(!s.tables["shop_product"].column.contains_key("qty"));
    }

    #[test]
    fn a_changed_xsi_type_replaces_the_element_whole() {
        let a = module("Vendor_A", "app/code/Vendor/A", PRODUCT, None);
        let b = module(
            "Vendor_B",
            "app/code/Vendor/B",
            r#"<table name="shop_product"><column xsi:type="text" name="sku"/></table>"#,
            None,
        );
        let s = merge(&[a, b]).unwrap();
        let sku = &s.tables["shop_product"].column["sku"];
        assert_eq!(sku.attrs.get("length"), None);
        assert!(nullable(sku));
    }

    #[test]
    fn config_php_gives_the_load_order_and_leaves_disabled_modules_out() {
        let cfg = "<?php\nreturn [\n    'modules' => [\n        'Magento_Store' => 1,\n        'Vendor_Off' => 0,\n        'Vendor_Shop' => 1,\n    ],\n    'system' => []\n];\n";
        assert_eq!(
            module_list(cfg),
            vec![
                ("Magento_Store".to_string(), true),
                ("Vendor_Off".to_string(), false),
                ("Vendor_Shop".to_string(), true)
            ]
        );
        let m = |n: &str, d: &str| ModuleFiles {
            name: n.into(),
            dir: d.into(),
            ..Default::default()
        };
        let found = vec![
            m("Vendor_Shop", "app/code/Vendor/Shop"),
            m("Vendor_Off", "app/code/Vendor/Off"),
            m("Magento_Store", "vendor/magento/module-store"),
        ];
        let names: Vec<String> = order_modules(found, &module_list(cfg))
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, vec!["Magento_Store", "Vendor_Shop"]);
    }

    #[test]
    fn a_release_is_read_through_its_handle_and_links_are_never_followed() {
        use std::os::fd::AsFd;
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(
            outside.path().join("secret.xml"),
            format!("{HEAD}</schema>"),
        )
        .unwrap();
        let shop = r.join("app/code/Vendor/Shop/etc");
        std::fs::create_dir_all(&shop).unwrap();
        std::fs::write(
            shop.join("module.xml"),
            r#"<config><module name="Vendor_Shop" setup_version="1.0.0"/></config>"#,
        )
        .unwrap();
        std::fs::write(
            shop.join("db_schema.xml"),
            format!("{HEAD}{PRODUCT}</schema>"),
        )
        .unwrap();
        // a vendor module that is a link: listed as unreadable, a breaking finding
        std::fs::create_dir_all(r.join("vendor/acme")).unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("vendor/acme/module-x")).unwrap();
        let root = rustix::fs::open(
            r,
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let s = read_release(root.as_fd(), r).unwrap();
        assert_eq!(s.table_count(), 1);
        assert_eq!(
            s.unreadable,
            vec![(
                "vendor/acme/module-x".to_string(),
                "vendor/acme/module-x".to_string()
            )]
        );
        let f = classify(&s, &s);
        assert_eq!(only(&f).class, Class::Breaking, "{f:#?}");
        // a db_schema.xml that is a link to a file outside: refused, naming the path
        std::fs::remove_file(shop.join("db_schema.xml")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret.xml"),
            shop.join("db_schema.xml"),
        )
        .unwrap();
        let e = read_release(root.as_fd(), r).unwrap_err().to_string();
        assert!(
            e.contains("app/code/Vendor/Shop/etc/db_schema.xml") && e.contains("symlink"),
            "{e}"
        );
    }

    #[test]
    fn bad_xml_names_the_file_and_line() {
        let e = merge(&[ModuleFiles {
            name: "X".into(),
            dir: DIR.into(),
            db_schema: Some(format!(
                "{HEAD}\n<table><column name=\"a\"/></table></schema>"
            )),
            whitelist: None,
        }])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(FILE) && e.contains("line 3") && e.contains("without a name"),
            "{e}"
        );
    }
}
