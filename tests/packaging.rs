//! The Debian and RPM packages as `packaging/build` leaves them in `target/packages/`: what
//! they hold, their maintainer scripts, lintian's verdict, and the packaged programs run from
//! an unpacked `.deb` with their packaged configuration and units.
//!
//! These tests never build the packages (they run under `cargo test`): run `packaging/build`
//! first. Without the packages they fail, they do not skip. They need dpkg-deb (dpkg), rpm,
//! lintian, shellcheck and systemd-analyze (systemd).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The programs, by the short name used in `packaging/` and `/etc/lifeline/<name>.toml`.
const PROGRAMS: [&str; 2] = ["carrier", "agent"];
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Deb,
    Rpm,
}

/// The one package of `program` in `format` in target/packages/.
fn package(program: &str, format: Format) -> PathBuf {
    let dir = root().join("target/packages");
    let (prefix, suffix) = match format {
        Format::Deb => (format!("lifeline-{program}_"), ".deb"),
        Format::Rpm => (format!("lifeline-{program}-"), ".rpm"),
    };
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(suffix)
        })
        .collect();
    assert!(
        found.len() == 1,
        "expected one {prefix}*{suffix} in {}, found {found:?}: run `packaging/build` first \
         (or `packaging/build --no-build` after `cargo build --release --locked`)",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

/// Runs `tool`; panics naming the Debian package that provides it when it is missing.
fn run<S: AsRef<OsStr>>(tool: &str, debian_package: &str, args: &[S]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (install the Debian package {debian_package})"))
}

/// Runs `tool` and returns its standard output; it must succeed.
fn stdout<S: AsRef<OsStr>>(tool: &str, debian_package: &str, args: &[S]) -> String {
    let out = run(tool, debian_package, args);
    assert!(
        out.status.success(),
        "{tool} {:?}: {}\n{}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a binary unpacked from a package.
/// Runs a packaged program; it must succeed.
fn run_packaged<S: AsRef<OsStr>>(binary: &Path, args: &[S]) -> Output {
    let out = Command::new(binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    assert!(
        out.status.success(),
        "{} {:?}: {}\n{}",
        binary.display(),
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn dpkg_deb<S: AsRef<OsStr>>(args: &[S]) -> String {
    stdout("dpkg-deb", "dpkg", args)
}

/// A field of a `.deb`'s control file.
fn deb_field(deb: &Path, field: &str) -> String {
    let value = dpkg_deb(&[OsStr::new("--field"), deb.as_os_str(), OsStr::new(field)]);
    value.trim().to_string()
}

fn rpm_query(rpm: &Path, query: &[&str]) -> String {
    let mut args: Vec<&OsStr> = vec![OsStr::new("-qp")];
    args.extend(query.iter().map(OsStr::new));
    args.push(rpm.as_os_str());
    stdout("rpm", "rpm", &args)
}

/// A package built from another version than this checkout's is stale.
fn assert_current_version(program: &str) {
    let deb = package(program, Format::Deb);
    let version = deb_field(&deb, "Version");
    assert_eq!(
        version.trim(),
        format!("{VERSION}-1"),
        "{} is stale: run `packaging/build`",
        deb.display()
    );
}

/// The `.deb` of `program` unpacked (`dpkg-deb -x`) into a temporary folder.
fn unpack(program: &str) -> tempfile::TempDir {
    let deb = package(program, Format::Deb);
    let dir = tempfile::tempdir().unwrap();
    dpkg_deb(&[OsStr::new("-x"), deb.as_os_str(), dir.path().as_os_str()]);
    dir
}

#[test]
fn the_debs_hold_the_program_its_unit_its_configuration_and_scripts() {
    for program in PROGRAMS {
        assert_current_version(program);
        let deb = package(program, Format::Deb);
        let contents = dpkg_deb(&[OsStr::new("--contents"), deb.as_os_str()]);
        let entry = |path: &str| {
            contents
                .lines()
                .find(|line| line.ends_with(&format!(" .{path}")))
                .unwrap_or_else(|| panic!("{} lacks {path}:\n{contents}", deb.display()))
                .to_string()
        };
        assert!(entry(&format!("/usr/bin/lifeline-{program}")).starts_with("-rwxr-xr-x 0/0"));
        entry(&format!("/lib/systemd/system/lifeline-{program}.service"));
        entry(&format!("/usr/share/doc/lifeline-{program}/README.md"));
        entry(&format!("/usr/share/doc/lifeline-{program}/copyright"));
        entry(&format!(
            "/usr/share/doc/lifeline-{program}/changelog.Debian.gz"
        ));
        let conf = entry(&format!("/etc/lifeline/{program}.toml"));
        assert!(
            conf.starts_with("-rw-r----- 0/0"),
            "the configuration holds secrets: {conf}"
        );
        assert!(
            !contents.contains(&format!("/usr/bin/lifeline-{}", other(program))),
            "{} holds the other program:\n{contents}",
            deb.display()
        );

        let conffiles = dpkg_deb(&[
            OsStr::new("--info"),
            deb.as_os_str(),
            OsStr::new("conffiles"),
        ]);
        assert_eq!(conffiles.trim(), format!("/etc/lifeline/{program}.toml"));
        let depends = deb_field(&deb, "Depends");
        assert!(
            depends.contains("adduser") && depends.contains("libc6"),
            "Depends: {depends}"
        );

        // The control archive's scripts are exactly the ones in packaging/deb/ (those that
        // shellcheck checks).
        let control = tempfile::tempdir().unwrap();
        let info = dpkg_deb(&[OsStr::new("--info"), deb.as_os_str()]);
        dpkg_deb(&[
            OsStr::new("--control"),
            deb.as_os_str(),
            control.path().as_os_str(),
        ]);
        for script in ["postinst", "prerm", "postrm"] {
            // `dpkg-deb --info` marks executable control members with `*`.
            assert!(
                info.lines().any(|l| {
                    let words: Vec<&str> = l.split_whitespace().collect();
                    words.windows(2).any(|w| w == ["*", script])
                }),
                "{} lacks an executable {script}:\n{info}",
                deb.display()
            );
            let packaged = std::fs::read_to_string(control.path().join(script)).unwrap();
            let source =
                std::fs::read_to_string(root().join(format!("packaging/deb/{program}/{script}")))
                    .unwrap();
            assert_eq!(
                packaged,
                source,
                "{script} of {} differs from packaging/deb/{program}/{script} (stale? run \
                 `packaging/build`)",
                deb.display()
            );
        }
    }
}

#[test]
fn the_rpms_hold_the_program_its_unit_its_configuration_and_scriptlets() {
    for program in PROGRAMS {
        let rpm = package(program, Format::Rpm);
        let files = rpm_query(&rpm, &["--list", "--verbose"]);
        let entry = |path: &str| {
            files
                .lines()
                .find(|line| line.ends_with(&format!(" {path}")))
                .unwrap_or_else(|| panic!("{} lacks {path}:\n{files}", rpm.display()))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(
            entry(&format!("/usr/bin/lifeline-{program}")).starts_with("-rwxr-xr-x 1 root root")
        );
        entry(&format!(
            "/usr/lib/systemd/system/lifeline-{program}.service"
        ));
        entry(&format!("/usr/share/doc/lifeline-{program}/README.md"));
        let conf = entry(&format!("/etc/lifeline/{program}.toml"));
        assert!(
            conf.starts_with("-rw-r----- 1 root lifeline"),
            "the configuration holds secrets: {conf}"
        );

        assert_eq!(
            rpm_query(&rpm, &["--configfiles"]).trim(),
            format!("/etc/lifeline/{program}.toml")
        );
        // %config(noreplace): an administrator's changes survive an upgrade.
        let flags = rpm_query(
            &rpm,
            &["--queryformat", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"],
        );
        let conf_flags = flags
            .lines()
            .find_map(|l| l.strip_prefix(&format!("/etc/lifeline/{program}.toml ")))
            .unwrap_or_else(|| panic!("{flags}"));
        assert!(
            conf_flags.contains('c') && conf_flags.contains('n'),
            "{program}.toml is not %config(noreplace): {conf_flags:?}"
        );
        assert_eq!(
            rpm_query(&rpm, &["--queryformat", "%{VERSION}"]),
            VERSION,
            "{} is stale: run `packaging/build`",
            rpm.display()
        );

        let scripts = rpm_query(&rpm, &["--scripts"]);
        for (heading, file) in [
            ("preinstall scriptlet", "pre"),
            ("postinstall scriptlet", "post"),
            ("preuninstall scriptlet", "preun"),
            ("postuninstall scriptlet", "postun"),
        ] {
            assert!(
                scripts.contains(heading),
                "{} lacks its {heading}:\n{scripts}",
                rpm.display()
            );
            let source =
                std::fs::read_to_string(root().join(format!("packaging/rpm/{program}/{file}")))
                    .unwrap();
            assert!(
                scripts.contains(source.trim_end()),
                "the {heading} of {} is not packaging/rpm/{program}/{file} (stale? run \
                 `packaging/build`):\n{scripts}",
                rpm.display()
            );
        }
    }
}

#[test]
fn lintian_finds_no_errors_in_the_debs() {
    let debs: Vec<PathBuf> = PROGRAMS.iter().map(|p| package(p, Format::Deb)).collect();
    let out = run("lintian", "lintian", &debs);
    let report = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian:\n{report}");
    assert!(
        out.status.success(),
        "lintian failed ({}):\n{report}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The leading comment block of config.example.toml.
fn example_header(example: &str) -> String {
    example
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn each_package_installs_its_own_part_of_the_example_configuration() {
    let example = std::fs::read_to_string(root().join("config.example.toml")).unwrap();
    let header = example_header(&example);
    assert!(!header.is_empty());
    let mut packaged_lines = HashSet::new();
    for program in PROGRAMS {
        let tree = unpack(program);
        let conf =
            std::fs::read_to_string(tree.path().join(format!("etc/lifeline/{program}.toml")))
                .unwrap();
        assert!(
            conf.starts_with(&header),
            "{program}.toml does not open with the example's comment block:\n{conf}"
        );
        let tables: Vec<&str> = conf
            .lines()
            .filter(|l| l.trim_start().starts_with('['))
            .collect();
        assert!(
            tables.contains(&format!("[{program}]").as_str()),
            "{program}.toml lacks [{program}]: {tables:?}"
        );
        let other = other(program);
        assert!(
            tables.iter().all(|t| {
                let name = t.trim_start_matches('[');
                name.starts_with(program) && !name.starts_with(other)
            }),
            "{program}.toml has tables other than its own: {tables:?}"
        );
        for line in conf.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                example.lines().any(|e| e == line),
                "{program}.toml has a line config.example.toml lacks (stale? run \
                 `packaging/build`): {line}"
            );
            packaged_lines.insert(line.to_string());
        }
    }
    for line in example.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            packaged_lines.contains(line),
            "neither package installs this line of config.example.toml (stale? run \
             `packaging/build`): {line}"
        );
    }
}

fn other(program: &str) -> &'static str {
    match program {
        "carrier" => "agent",
        _ => "carrier",
    }
}

/// `--version` of a packaged binary: `lifeline-<program> <version> (commit <12 hex>)`.
fn assert_version(binary: &Path, program: &str) {
    let out = run_packaged(binary, &["--version"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let commit = text
        .trim()
        .strip_prefix(&format!("lifeline-{program} {VERSION} (commit "))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{} --version printed {text:?}", binary.display()));
    assert!(
        commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{} --version names no commit: {text:?}",
        binary.display()
    );
}

#[test]
fn the_packaged_agent_runs_and_accepts_its_packaged_configuration() {
    let tree = unpack("agent");
    let agent = tree.path().join("usr/bin/lifeline-agent");
    assert_version(&agent, "agent");
    let conf = tree.path().join("etc/lifeline/agent.toml");
    run_packaged(&agent, &[OsStr::new("check-config"), conf.as_os_str()]);
}

#[test]
fn the_packaged_carrier_runs_and_accepts_its_packaged_configuration() {
    let tree = unpack("carrier");
    let carrier = tree.path().join("usr/bin/lifeline-carrier");
    assert_version(&carrier, "carrier");
    // The carrier has no check-config: `admin account list` loads the configuration (exit 78
    // when it is refused), then lists the accounts of an empty store in a scratch folder.
    let conf = tree.path().join("etc/lifeline/carrier.toml");
    let data = tempfile::tempdir().unwrap();
    run_packaged(
        &carrier,
        &[
            OsStr::new("--config"),
            conf.as_os_str(),
            OsStr::new("--data-dir"),
            data.path().as_os_str(),
            OsStr::new("admin"),
            OsStr::new("account"),
            OsStr::new("list"),
        ],
    );
}

#[test]
fn the_packaged_units_verify_with_the_packaged_binaries() {
    let units = tempfile::tempdir().unwrap();
    let mut trees = Vec::new();
    for program in PROGRAMS {
        let tree = unpack(program);
        let name = format!("lifeline-{program}");
        let unit = std::fs::read_to_string(
            tree.path()
                .join(format!("lib/systemd/system/{name}.service")),
        )
        .unwrap();
        let doc = format!("Documentation=file:///usr/share/doc/{name}/README.md");
        assert!(unit.contains(&doc), "{name}.service lacks {doc}");
        assert!(
            tree.path()
                .join(format!("usr/share/doc/{name}/README.md"))
                .is_file()
        );
        let exec = format!("ExecStart=/usr/bin/{name} ");
        assert!(unit.contains(&exec), "{name}.service lacks {exec}");
        assert!(
            unit.contains(&format!("/etc/lifeline/{program}.toml")),
            "{name}.service does not read /etc/lifeline/{program}.toml"
        );
        let binary = tree.path().join(format!("usr/bin/{name}"));
        let unit = unit.replace(&format!("/usr/bin/{name}"), binary.to_str().unwrap());
        std::fs::write(units.path().join(format!("{name}.service")), unit).unwrap();
        trees.push(tree);
    }
    let out = run(
        "systemd-analyze",
        "systemd",
        &[
            OsStr::new("verify"),
            units.path().join("lifeline-carrier.service").as_os_str(),
            units.path().join("lifeline-agent.service").as_os_str(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("lifeline"),
        "systemd-analyze complained about the packaged units:\n{stderr}"
    );
}

/// Every shell script in packaging/: the maintainer scripts, the RPM scriptlets, the build.
fn shell_scripts() -> Vec<PathBuf> {
    let mut scripts = vec![root().join("packaging/build")];
    for format in ["deb", "rpm"] {
        for program in PROGRAMS {
            let dir = root().join(format!("packaging/{format}/{program}"));
            let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|entry| entry.unwrap().path())
                .collect();
            found.sort();
            scripts.extend(found);
        }
    }
    scripts
}

#[test]
fn the_packaging_scripts_pass_shellcheck() {
    let scripts = shell_scripts();
    assert!(scripts.len() >= 15, "{scripts:?}");
    let mut args = vec![OsStr::new("--shell=sh")];
    args.extend(scripts.iter().map(|s| s.as_os_str()));
    let out = run("shellcheck", "shellcheck", &args);
    assert!(
        out.status.success(),
        "shellcheck:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The agent's scripts are the carrier's with the names swapped: a fix made to one package's
/// scripts is made to the other's.
#[test]
fn the_agent_scripts_are_the_carrier_scripts_with_the_names_swapped() {
    for format in ["deb", "rpm"] {
        let dir = root().join(format!("packaging/{format}/carrier"));
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        let mut agent_names: Vec<_> =
            std::fs::read_dir(root().join(format!("packaging/{format}/agent")))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
        agent_names.sort();
        assert_eq!(names, agent_names, "packaging/{format}");
        for name in names {
            let carrier = std::fs::read_to_string(dir.join(&name)).unwrap();
            let agent = std::fs::read_to_string(
                root().join(format!("packaging/{format}/agent")).join(&name),
            )
            .unwrap();
            let swapped = carrier
                .replace("carrier", "\u{0}")
                .replace("agent", "carrier")
                .replace('\u{0}', "agent");
            assert_eq!(
                swapped,
                agent,
                "packaging/{format}/agent/{} is not packaging/{format}/carrier/{0} with the \
                 names swapped",
                name.to_string_lossy()
            );
        }
    }
}
