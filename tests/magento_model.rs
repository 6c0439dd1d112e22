//! The Magento model (tests/fixtures/magento-model) behaves as the Magento it models, served by
//! real nginx and php-fpm against a real MariaDB: the version guard and its blue/green skip,
//! setup:upgrade applying the declarative schema, old code after an additive and after a
//! breaking upgrade, maintenance, cron's refusal. Other tests build on these facts.

mod support;

use std::path::Path;
use std::process::Command;

fn env_php(db: &support::MariaDb, blue_green: bool) -> String {
    format!(
        "<?php return ['deployment' => ['blue_green' => ['enabled' => {blue_green}]], 'db' => ['connection' => ['default' => \
         ['host' => '127.0.0.1', 'port' => {}, 'dbname' => 'app', 'username' => 'app', 'password' => 'apppass']]]];\n",
        db.port
    )
}

fn release(root: &Path, id: &str, variant: Option<&str>, env: &str) {
    let r = root.join("releases").join(id);
    support::magento_model(&r, variant);
    std::fs::write(r.join("RELEASE_ID"), id).unwrap();
    std::fs::write(r.join("app/etc/env.php"), env).unwrap();
}

fn magento(root: &Path, id: &str, args: &[&str]) -> (i32, String) {
    let o = Command::new(support::require("php"))
        .arg("bin/magento")
        .args(args)
        .current_dir(root.join("releases").join(id))
        .output()
        .unwrap();
    (o.status.code().unwrap_or(-1), support::text(&o))
}

#[test]
fn the_magento_model_guards_versions_skips_with_blue_green_and_old_code_meets_the_new_schema() {
    support::require("php");
    let db = support::MariaDb::start();
    let app = tempfile::tempdir().unwrap();
    let root = app.path();
    release(root, "r1", None, &env_php(&db, false));
    std::os::unix::fs::symlink("releases/r1", root.join("current")).unwrap();
    let web = support::Web::start(root);

    // an empty database: the guard sends to setup:upgrade
    let (code, body) = web.get("/catalog");
    assert_eq!(code, 500, "{body}");
    assert!(
        body.contains("Please upgrade your database: Run \"bin/magento setup:upgrade\" from the Magento root directory.\nThe following modules are outdated:\nMagento_Store schema: current version - none, required version - 2.4.7"),
        "{body}"
    );
    assert_eq!(magento(root, "r1", &["setup:db:status"]).0, 2);
    let (code, out) = magento(root, "r1", &["setup:upgrade", "--keep-generated"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        magento(root, "r1", &["setup:db:status"]),
        (0, "All modules are up to date.\n".into())
    );
    assert_eq!(web.get("/write").0, 200);
    // nginx answers PHP chunked: compare what the body holds
    let (code, body) = web.get("/catalog");
    assert!(
        code == 200 && body.contains("release=r1 rows=3\n"),
        "{code} {body}"
    );

    // the additive release upgrades the database; old code without the flag refuses ...
    release(root, "r2", Some("additive"), &env_php(&db, true));
    let (code, out) = magento(root, "r2", &["setup:db:status"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("Vendor_Shop schema: current version - 1.0.0, required version - 1.1.0"),
        "{out}"
    );
    assert_eq!(
        magento(root, "r2", &["setup:upgrade", "--keep-generated"]).0,
        0
    );
    let (code, body) = web.get("/catalog");
    assert_eq!(code, 500);
    assert!(
        body.contains("Please update your modules: Run \"composer install\" from the Magento root directory.\nThe following modules are outdated:\nVendor_Shop schema: code version - 1.0.0, database version - 1.1.0"),
        "{body}"
    );
    assert_eq!(
        db.sql("SELECT COLUMN_NAME, IS_NULLABLE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = 'app' AND TABLE_NAME = 'shop_product' AND COLUMN_NAME = 'subtitle'"),
        "subtitle\tYES\n"
    );
    // ... and the same code with deployment/blue_green/enabled serves, reading and writing
    // (another release dir: opcache keeps r1's env.php for a while, as it would in production)
    release(root, "r1bg", None, &env_php(&db, true));
    std::os::unix::fs::symlink("releases/r1bg", root.join("current.tmp")).unwrap();
    std::fs::rename(root.join("current.tmp"), root.join("current")).unwrap();
    assert_eq!(web.get("/catalog").0, 200);
    assert_eq!(web.get("/write").0, 200);

    // a breaking release renames a column old code reads: old code fails in its SQL
    release(root, "r3", Some("breaking"), &env_php(&db, true));
    assert_eq!(
        magento(root, "r3", &["setup:upgrade", "--keep-generated"]).0,
        0
    );
    let (code, body) = web.get("/catalog");
    assert_eq!(code, 500);
    assert!(body.contains("Unknown column 'price'"), "{body}");

    // maintenance: 503, and cron does not run
    assert_eq!(magento(root, "r1bg", &["maintenance:enable"]).0, 0);
    assert_eq!(web.get("/").0, 503);
    assert_eq!(
        magento(root, "r1bg", &["cron:run"]),
        (
            0,
            "Cron is disabled because the maintenance mode is enabled.\n".into()
        )
    );
    assert_eq!(magento(root, "r1bg", &["maintenance:disable"]).0, 0);
    assert_eq!(web.get("/").0, 200);
    assert_eq!(
        db.sql("SELECT command, COUNT(*) FROM app.model_runs GROUP BY command"),
        "setup:upgrade\t3\n"
    );
}
