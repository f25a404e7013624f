use super::*;
use std::fs::File;
use std::io::Read;

use chrono::NaiveDateTime;

use super::retention::{compress_to, lock, same_content};
use super::rotation::{period_index, rotated_name, Members};
use super::writer::{truncate_path, MAX_OPEN_FILES};
use crate::config::units::ByteSize;
use crate::sink::naming;
use crate::sink::naming::template::format_time;
use crate::sink::BufferConfig;
use crate::sink::{Sink, SinkConfig};
use chrono::Utc;

use crate::sink::test_event as event;

fn config(path: &str, fsync: FsyncPolicy) -> FileSinkConfig {
    FileSinkConfig {
        fsync,
        ..FileSinkConfig::new(path)
    }
}

fn sink_in(dir: &Path, template: &str, fsync: FsyncPolicy) -> FileSink {
    let path = format!("{}/{template}", dir.display());
    let cfg = config(&path, fsync);
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    FileSink::build("archive", &cfg).unwrap()
}

fn read_events(path: &Path) -> Vec<Event> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| jsonl::decode(l).unwrap())
        .collect()
}

fn seqs(path: &Path) -> Vec<u64> {
    read_events(path).iter().map(|e| e.seq).collect()
}

fn errors(path: &str) -> Vec<String> {
    config(path, FsyncPolicy::Always)
        .validate()
        .into_iter()
        .map(|(k, m)| {
            assert_eq!(k, "path");
            m
        })
        .collect()
}

#[test]
fn config_defaults_and_unknown_keys() {
    let c: SinkConfig = toml::from_str("type = \"file\"\npath = \"data/{feed}.jsonl\"").unwrap();
    let SinkConfig::File(f) = &c else {
        panic!("not a file sink: {c:?}")
    };
    assert_eq!(f.fsync, FsyncPolicy::Always);
    assert_eq!(f.fsync_interval, Duration::from_secs(1));
    assert_eq!(f.buffer, BufferConfig::default());
    let c: SinkConfig = toml::from_str(
        "type = \"file\"\npath = \"x\"\nfsync = \"interval\"\nfsync_interval = \"250ms\"",
    )
    .unwrap();
    let SinkConfig::File(f) = &c else {
        panic!("not a file sink: {c:?}")
    };
    assert_eq!(f.fsync, FsyncPolicy::Interval);
    assert_eq!(f.fsync_interval, Duration::from_millis(250));
    assert!(
        toml::from_str::<SinkConfig>("type = \"file\"\npath = \"x\"\nfsnyc = \"never\"").is_err()
    );
    assert!(
        toml::from_str::<SinkConfig>("type = \"file\"\npath = \"x\"\nfsync = \"sometimes\"")
            .is_err()
    );
}

#[test]
fn valid_templates_and_their_base() {
    for (t, base, parts) in [
        ("data/events/{feed}.jsonl", "data/events", 1),
        ("{feed}/x.jsonl", ".", 2),
        ("x.jsonl", ".", 1),
        ("data/x.jsonl", "data", 1),
        ("data//{feed}/events/{type}.jsonl", "data", 3),
        ("/var/lib/b/{feed}-{type}.jsonl", "/var/lib/b", 1),
        ("/var/{feed}/x.jsonl", "/var", 2),
        ("/x.jsonl", "/", 1),
        ("d/.hidden-{feed}.log", "d", 1),
        ("d/{type}.{feed}.x", "d", 1),
    ] {
        assert!(errors(t).is_empty(), "{t}: {:?}", errors(t));
        let tpl = Template::parse(t, 0).unwrap();
        assert_eq!(tpl.base, Path::new(base), "{t}");
        assert_eq!(tpl.components.len(), parts, "{t}");
    }
}

#[test]
fn invalid_templates() {
    for (t, expect) in [
        ("", "must not be empty"),
        ("../x", "`..`"),
        ("data/../../etc/x", "`..`"),
        ("/abs/../x", "`..`"),
        ("./x.jsonl", "`.`"),
        ("a/./b", "`.`"),
        ("data/{foo}.jsonl", "unknown placeholder `{foo}`"),
        ("data/{Feed}.jsonl", "unknown placeholder `{Feed}`"),
        ("data/{}.jsonl", "unknown placeholder `{}`"),
        ("data/{feed.jsonl", "unbalanced `{`"),
        ("data/{fe{feed}}.jsonl", "unbalanced `{`"),
        ("data/feed}.jsonl", "unbalanced `}`"),
        ("data/{fe/ed}.jsonl", "unbalanced"),
        ("data/", "must end with a file name"),
        ("/{type}/x.jsonl", "directly under `/`"),
        ("/{feed}.jsonl", "directly under `/`"),
        ("data/{type}", "does not end with a fixed extension"),
        ("data/{type}.{feed}", "such as `{type}.{feed}.jsonl`"),
        ("data/{feed}-{type}.", "does not end with a fixed extension"),
        ("data/events-%Y-%m-%d", "such as `events-%Y-%m-%d.jsonl`"),
    ] {
        let errs = errors(t);
        assert!(
            errs.iter().any(|e| e.contains(expect)),
            "{t}: expected {expect:?} in {errs:?}"
        );
    }
    let mut c = config("x", FsyncPolicy::Interval);
    c.fsync_interval = Duration::ZERO;
    assert_eq!(
        c.validate(),
        [(
            "fsync_interval".to_string(),
            "must be greater than zero".to_string()
        )]
    );
    assert!(FileSink::build("s", &config("../x", FsyncPolicy::Always)).is_err());
}

#[test]
fn accepted_types() {
    let typed = config("data/{feed}/{type}.jsonl", FsyncPolicy::Always);
    // Any type is encoded into a safe name, as long as the name fits.
    for ok in [
        "message",
        "edit",
        "log.v2",
        "a-b_c",
        "A9",
        &"x".repeat(200),
        ".",
        "..",
        ".hidden",
        "a/b",
        "a\\b",
        "sp ace",
        "caf\u{e9}",
        "a\0",
        "{feed}",
        &"\u{e9}".repeat(33),
    ] {
        assert!(typed.accepts_type(ok), "{ok:?}");
    }
    for bad in ["", &"x".repeat(201), &"/".repeat(67), &"\u{e9}".repeat(34)] {
        assert!(!typed.accepts_type(bad), "{bad:?}");
    }
    // A file name over 255 bytes (with the longest feed name) is refused.
    let long = config("data/{feed}-{type}.jsonl", FsyncPolicy::Always);
    assert!(long.accepts_type(&"x".repeat(140)));
    assert!(!long.accepts_type(&"x".repeat(160)));
    assert!(!long.accepts_type(&" ".repeat(50)));
    // Without {type}, every type fits.
    let untyped = config("data/{feed}.jsonl", FsyncPolicy::Always);
    assert!(untyped.accepts_type("../../etc/passwd"));
    assert!(SinkConfig::File(typed).accepts_type("edit"));
}

#[test]
fn any_type_is_stored_under_its_encoded_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = sink_in(dir.path(), "out/{feed}/{type}.jsonl", FsyncPolicy::Always);
    let types = [
        "../../escape",
        "..",
        ".",
        "x/y",
        "\u{e9}t\u{e9}",
        "a b",
        "%41",
        "A",
        "state.db",
    ];
    let events: Vec<Arc<Event>> = types
        .iter()
        .enumerate()
        .map(|(i, t)| event("ok", t, i as u64 + 1, "x"))
        .collect();
    sink.write(&events).unwrap();
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(dir.path().join("out/ok")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let stem = name.strip_suffix(".jsonl").expect("the sink's own suffix");
        let decoded = naming::decode(stem).expect("a name the encoder wrote");
        for e in read_events(&dir.path().join("out/ok").join(&name)) {
            assert_eq!(e.event_type.as_ref(), decoded, "{name}");
            stored.push(e.seq);
        }
    }
    stored.sort_unstable();
    assert_eq!(stored, (1..=types.len() as u64).collect::<Vec<_>>());
    let top: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(top, ["out"]);
    // An empty feed name (the config loader refuses it) cannot make a name; the good
    // event before it is rolled back.
    let err = sink
        .write(&[event("ok", "fine", 20, "x"), event("", "t", 21, "y")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sink `archive`") && err.contains("not usable"),
        "{err}"
    );
    sink.write(&[event("ok", "fine", 22, "z")]).unwrap();
    assert_eq!(seqs(&dir.path().join("out/ok/fine.jsonl")), [22]);
}

#[test]
fn rendered_paths_are_confined() {
    let tpl = Template::parse("/srv/data/{feed}/{type}.jsonl", 0).unwrap();
    assert!(tpl.is_confined(Path::new("/srv/data/a/b.jsonl")));
    assert!(!tpl.is_confined(Path::new("/srv/data/../b.jsonl")));
    assert!(!tpl.is_confined(Path::new("/srv/data/a/../../b.jsonl")));
    assert!(!tpl.is_confined(Path::new("/srv/other/a/b.jsonl")));
    assert!(!tpl.is_confined(Path::new("/srv/data/a/b/c.jsonl")));
    let rel = Template::parse("{feed}/{type}.jsonl", 0).unwrap();
    assert!(rel.is_confined(Path::new("a/b.jsonl")));
    assert!(!rel.is_confined(Path::new("/a/b.jsonl")));
    assert!(!rel.is_confined(Path::new("../b.jsonl")));
    let mut out = String::new();
    rel.render("f", "t", &[], &mut out).unwrap();
    assert_eq!(out, "f/t.jsonl");
    tpl.render("f", "t", &[], &mut out).unwrap();
    assert_eq!(out, "/srv/data/f/t.jsonl");
}

#[test]
fn failed_write_rolls_back_and_retry_leaves_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = sink_in(dir.path(), "{feed}/{type}.jsonl", FsyncPolicy::Always);
    sink.write(&[event("f", "a", 1, "first")]).unwrap();
    let a = dir.path().join("f/a.jsonl");
    let before = std::fs::read(&a).unwrap();

    // A directory where the sink wants the file `f/b.jsonl`: opening it fails, for root too.
    let in_the_way = dir.path().join("f/b.jsonl");
    std::fs::create_dir(&in_the_way).unwrap();
    // Larger than the write buffer, so part of it reaches the file before the failure.
    let big = "x".repeat(200 * 1024);
    let batch = [
        event("f", "a", 2, &big),
        event("f", "b", 3, "blocked"),
        event("f", "a", 4, "after"),
    ];
    let err = sink.write(&batch).unwrap_err().to_string();
    assert!(
        err.contains("sink `archive`") && err.contains(&in_the_way.display().to_string()),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&a).unwrap(),
        before,
        "rolled back to the old length"
    );
    // Retrying fails the same way, still without leaving anything behind.
    assert!(sink.write(&batch).is_err());
    assert_eq!(std::fs::read(&a).unwrap(), before);

    // Once the obstacle is gone, the retry stores the batch exactly once.
    std::fs::remove_dir(&in_the_way).unwrap();
    sink.write(&batch).unwrap();
    assert_eq!(seqs(&a), [1, 2, 4]);
    assert_eq!(read_events(&a)[1].data, big);
    assert_eq!(seqs(&in_the_way), [3]);
}

#[test]
fn a_directory_in_the_way_of_a_parent_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = sink_in(dir.path(), "{feed}/{type}.jsonl", FsyncPolicy::Always);
    std::fs::write(dir.path().join("f"), "a file, not a directory").unwrap();
    let err = sink
        .write(&[event("f", "a", 1, "x")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot create the directory"), "{err}");
}

#[test]
fn many_files_stay_under_the_handle_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = sink_in(dir.path(), "{feed}/{type}.jsonl", FsyncPolicy::Interval);
    let n = MAX_OPEN_FILES as u64 + 44;
    let batch: Vec<_> = (1..=n)
        .map(|i| event("f", &format!("t{i}"), i, "x"))
        .collect();
    sink.write(&batch).unwrap();
    assert!(sink.files.len() <= MAX_OPEN_FILES, "{}", sink.files.len());
    sink.write(&batch[..10]).unwrap();
    for i in 1..=n {
        let expected: Vec<u64> = if i <= 10 { vec![i, i] } else { vec![i] };
        assert_eq!(seqs(&dir.path().join(format!("f/t{i}.jsonl"))), expected);
    }
    sink.flush().unwrap();
    assert!(sink.files.values().all(|f| !f.unsynced));
}

#[test]
fn fsync_policies_track_unsynced_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut always = sink_in(dir.path(), "a/{feed}.jsonl", FsyncPolicy::Always);
    always.write(&[event("f", "t", 1, "x")]).unwrap();
    assert!(always.files.values().all(|f| !f.unsynced));
    assert!(always.dirs_to_sync.is_empty(), "new directories synced too");

    let path = format!("{}/i/{{feed}}.jsonl", dir.path().display());
    let mut cfg = config(&path, FsyncPolicy::Interval);
    cfg.fsync_interval = Duration::from_millis(20);
    let mut interval = FileSink::build("i", &cfg).unwrap();
    interval.write(&[event("f", "t", 1, "x")]).unwrap();
    assert!(interval.files.values().all(|f| f.unsynced));
    assert!(!interval.dirs_to_sync.is_empty());
    // Flushed to the OS already: readable before any fsync.
    assert_eq!(seqs(&dir.path().join("i/f.jsonl")), [1]);
    std::thread::sleep(Duration::from_millis(30));
    interval.tick().unwrap();
    assert!(interval.files.values().all(|f| !f.unsynced));
    assert!(interval.dirs_to_sync.is_empty());

    let mut never = sink_in(dir.path(), "n/{feed}.jsonl", FsyncPolicy::Never);
    never.write(&[event("f", "t", 1, "x")]).unwrap();
    never.tick().unwrap();
    assert!(never.files.values().all(|f| f.unsynced));
    never.flush().unwrap();
    assert!(never.files.values().all(|f| !f.unsynced));
}

#[test]
fn links_below_the_base_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("target");
    std::fs::write(&target, "precious\n").unwrap();
    std::fs::create_dir(outside.path().join("dir")).unwrap();
    std::fs::create_dir_all(dir.path().join("out/f")).unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("out/f/message.jsonl")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("dir"), dir.path().join("out/g")).unwrap();
    // A FIFO does not hang the sink.
    let fifo = dir.path().join("out/f/fifo.jsonl");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut sink = sink_in(dir.path(), "out/{feed}/{type}.jsonl", FsyncPolicy::Always);
    for (feed, t, expect) in [
        ("f", "message", "out/f/message.jsonl"),
        ("g", "message", "out/g"),
        ("f", "fifo", "out/f/fifo.jsonl"),
    ] {
        let err = sink
            .write(&[event(feed, t, 1, "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{err}");
        if expect != "out/f/fifo.jsonl" {
            assert!(err.contains("symbolic link"), "{err}");
        } else {
            assert!(err.contains("not a regular file"), "{err}");
        }
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"precious\n");
    assert_eq!(
        std::fs::read_dir(outside.path().join("dir"))
            .unwrap()
            .count(),
        0
    );
    // The undo of a failed batch does not truncate through a link planted meanwhile.
    sink.write(&[event("f", "t", 1, "x")]).unwrap();
    let own = dir.path().join("out/f/t.jsonl");
    std::fs::remove_file(&own).unwrap();
    std::os::unix::fs::symlink(&target, &own).unwrap();
    assert!(truncate_path(&own, 0, false)
        .unwrap_err()
        .to_string()
        .contains("symbolic link"));
    assert_eq!(std::fs::read(&target).unwrap(), b"precious\n");
}

#[test]
fn only_the_sinks_own_torn_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = sink_in(dir.path(), "{feed}.jsonl", FsyncPolicy::Always);
    let line = encoded(&[event("a", "t", 1, "x")]);
    for (name, content, cut_to) in [
        // Foreign: not cut, refused.
        ("b", b"SQLite format 3\0\x01\x02".to_vec(), None),
        ("c", b"key = 1\nname = \"x\"".to_vec(), None),
        ("d", [b"not json\n".as_slice(), &line[..10]].concat(), None),
        (
            "e",
            b"{\"feed\":\"x\",\"type\":\"t\"}\n{\"fe".to_vec(),
            None,
        ),
        // The sink's own: the unfinished line is cut.
        ("f", line[..10].to_vec(), Some(0)),
        ("g", b"{\"fe".to_vec(), Some(0)),
        (
            "h",
            [line.as_slice(), &line[..20]].concat(),
            Some(line.len()),
        ),
    ] {
        let path = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&path, &content).unwrap();
        let result = sink.write(&[event(name, "t", 2, "y")]);
        match cut_to {
            None => {
                let err = result.unwrap_err().to_string();
                assert!(
                    err.contains(&format!("refusing to append to {}", path.display()))
                        && err.contains("not a JSON line written by this sink"),
                    "{name}: {err}"
                );
                assert_eq!(std::fs::read(&path).unwrap(), content, "{name}");
            }
            Some(keep) => {
                result.unwrap();
                let after = std::fs::read(&path).unwrap();
                assert_eq!(after[..keep], content[..keep], "{name}");
                assert_eq!(decode_all(&after[keep..], name).len(), 1, "{name}");
            }
        }
    }
}

#[test]
fn paths_that_can_reach_a_file_are_found() {
    let cwd = Path::new("/srv/b");
    for (template, target, hit) in [
        ("data/{type}.db", "data/state.db", true),
        ("data/{type}.db", "/srv/b/data/./x/../state.db", true),
        ("data/state.db", "data/state.db", true),
        ("/srv/b/data/{type}.jsonl", "data/state.db", false),
        ("data/{type}.jsonl", "data/state.db-wal", false),
        ("data/{feed}-{type}.jsonl", "data/config.jsonl", false),
        ("data/{feed}-{type}.jsonl", "data/a-config.jsonl", true),
        ("data/{feed}/{type}.jsonl", "data/a/b.jsonl", true),
        ("data/{feed}/{type}.jsonl", "data/b.jsonl", false),
        // Rotated, compressed and temporary names.
        ("data/s.db", "data/s.2026-11-24T08-30-00.123Z.db", true),
        ("data/{type}.toml", "data/config.toml.gz.tmp", true),
        ("conf/%Y.toml", "conf/sse-bridge.toml", true),
        ("data/s.db", "data/s.db-wal", false),
        ("other/{type}.db", "data/state.db", false),
    ] {
        let c = FileSinkConfig::new(template);
        assert_eq!(
            c.can_write_to(Path::new(target), cwd),
            hit,
            "{template} -> {target}"
        );
    }
}

#[test]
fn a_non_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = sink_in(dir.path(), "{feed}.jsonl", FsyncPolicy::Always);
    std::fs::create_dir(dir.path().join("f.jsonl")).unwrap();
    let err = sink
        .write(&[event("f", "t", 1, "x")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a regular file"), "{err}");
}

// ---- rotation, retention, compression, reopen ----

type Now = Arc<Mutex<DateTime<Utc>>>;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A clock the test moves by hand.
fn manual_clock(start: &str) -> (Clock, Now) {
    let now = Arc::new(Mutex::new(at(start)));
    let read = now.clone();
    (Arc::new(move || *read.lock().unwrap()), now)
}

fn set(now: &Now, s: &str) {
    *now.lock().unwrap() = at(s);
}

fn rotating_sink(
    dir: &Path,
    template: &str,
    clock: Clock,
    configure: impl FnOnce(&mut FileSinkConfig),
) -> FileSink {
    let mut cfg = FileSinkConfig::new(format!("{}/{template}", dir.display()));
    configure(&mut cfg);
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    FileSink::build_with_clock("archive", &cfg, clock).unwrap()
}

/// File names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// A file's content, decompressed according to its suffix.
fn content(path: &Path) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap();
    let name = path.to_str().unwrap();
    let mut out = Vec::new();
    if name.ends_with(".gz") {
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .unwrap();
    } else if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(&raw[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
    } else {
        out = raw;
    }
    out
}

/// The events of a JSON Lines file: whole lines only, each one a valid event.
fn decode_all(bytes: &[u8], what: &str) -> Vec<Event> {
    if bytes.is_empty() {
        return Vec::new();
    }
    assert_eq!(bytes.last(), Some(&b'\n'), "{what} ends in a partial line");
    std::str::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| jsonl::decode(l).unwrap_or_else(|e| panic!("{what}: {e}: {l}")))
        .collect()
}

fn encoded(events: &[Arc<Event>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        jsonl::encode(e, &mut out);
    }
    out
}

#[test]
fn rotation_keys_in_the_config() {
    let c: SinkConfig = toml::from_str(
        "type = \"file\"\npath = \"data/{feed}.jsonl\"\nrotate_size = \"100 MiB\"\n\
         rotate_interval = \"1h\"\nmax_files = 7\nmax_age = \"30d\"\ncompress = \"zstd\"",
    )
    .unwrap();
    let SinkConfig::File(f) = &c else {
        panic!("not a file sink: {c:?}")
    };
    assert_eq!(f.rotate_size, Some(ByteSize::mib(100)));
    assert_eq!(f.rotate_interval, Some(Duration::from_secs(3600)));
    assert_eq!(f.max_files, Some(7));
    assert_eq!(f.max_age, Some(Duration::from_secs(30 * 86400)));
    assert_eq!(f.compress, Compress::Zstd);
    assert!(c.validate().is_empty(), "{:?}", c.validate());

    let c: SinkConfig = toml::from_str("type = \"file\"\npath = \"x.jsonl\"").unwrap();
    assert_eq!(c, SinkConfig::File(FileSinkConfig::new("x.jsonl")));
    for bad in [
        "compress = \"bzip2\"",
        "rotate_size = \"1 parsec\"",
        "rotate_interval = \"soon\"",
        "max_files = -1",
        "rotate_files = 3",
    ] {
        assert!(
            toml::from_str::<SinkConfig>(&format!("type = \"file\"\npath = \"x\"\n{bad}")).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn rotation_keys_are_validated() {
    let issues = |f: &dyn Fn(&mut FileSinkConfig)| {
        let mut c = FileSinkConfig::new("data/{feed}.jsonl");
        f(&mut c);
        c.validate()
    };
    let has = |issues: Vec<(String, String)>, key: &str, text: &str| {
        assert!(
            issues.iter().any(|(k, m)| k == key && m.contains(text)),
            "{key}: {text:?} not in {issues:?}"
        );
    };
    has(
        issues(&|c| c.rotate_size = Some(ByteSize(0))),
        "rotate_size",
        "greater than zero",
    );
    for d in [Duration::ZERO, Duration::from_millis(1500)] {
        has(
            issues(&|c| c.rotate_interval = Some(d)),
            "rotate_interval",
            "whole number of seconds",
        );
    }
    has(
        issues(&|c| {
            c.rotate_size = Some(ByteSize(1));
            c.max_files = Some(0);
        }),
        "max_files",
        "at least 1",
    );
    has(
        issues(&|c| {
            c.rotate_size = Some(ByteSize(1));
            c.max_age = Some(Duration::ZERO);
        }),
        "max_age",
        "greater than zero",
    );
    // Retention and compression need something that closes files.
    has(issues(&|c| c.max_files = Some(3)), "max_files", "no effect");
    has(
        issues(&|c| c.compress = Compress::Gzip),
        "compress",
        "no effect",
    );
    has(
        issues(&|c| c.max_age = Some(Duration::from_secs(1))),
        "max_age",
        "no effect",
    );
    let mut c = FileSinkConfig::new("data/{feed}-%Y-%m-%d.jsonl");
    c.max_files = Some(3);
    c.compress = Compress::Gzip;
    assert!(c.validate().is_empty(), "{:?}", c.validate());

    for good in [
        "data/{feed}-%Y-%m-%d.jsonl",
        "data/%Y%m%dT%H%M.jsonl",
        "data/{feed}/{type}.%G-W%V.jsonl",
        "data/x-%Y-%j.log",
        "data/x-%s.jsonl",
        "data/x-%Y-%m.jsonl",
        "data/%F-{feed}.jsonl",
        "data/100%%-{feed}-%Y-%m-%d.jsonl",
        "data/%Y-%m-%dT%H-%M-%S%.3f.jsonl",
    ] {
        assert!(errors(good).is_empty(), "{good}: {:?}", errors(good));
    }
    for (bad, expect) in [
        ("data/%Y/{feed}.jsonl", "only allowed in the file name"),
        ("%Y/x.jsonl", "only allowed in the file name"),
        ("data/x-%Q.jsonl", "not a valid strftime format"),
        ("data/x-100%.jsonl", "not a valid strftime format"),
        ("data/x-%D.jsonl", "`/`"),
        ("data/x-%Y%n.jsonl", "control character"),
        ("data/x-%a.jsonl", "cannot be ordered"),
        ("data/x-%H.jsonl", "cannot be ordered"),
        ("data/x-%m-%d.jsonl", "cannot be ordered"),
        ("data/x-%Y-%j", "does not end with a fixed extension"),
    ] {
        let errs = errors(bad);
        assert!(
            errs.iter().any(|e| e.contains(expect)),
            "{bad}: expected {expect:?} in {errs:?}"
        );
    }
    // The rotation suffixes need room in the file name.
    let long = format!("data/{}-{{feed}}.jsonl", "x".repeat(140));
    assert!(FileSinkConfig::new(long.as_str()).validate().is_empty());
    let mut c = FileSinkConfig::new(long.as_str());
    c.rotate_size = Some(ByteSize(1000));
    c.compress = Compress::Zstd;
    assert!(
        c.validate()
            .iter()
            .any(|(k, m)| k == "path" && m.contains("rotation and compression suffixes")),
        "{:?}",
        c.validate()
    );
    let mut typed = FileSinkConfig::new("data/{feed}-{type}.jsonl");
    assert!(typed.accepts_type(&"t".repeat(140)));
    typed.rotate_size = Some(ByteSize(1000));
    assert!(!typed.accepts_type(&"t".repeat(140)));
    assert!(typed.accepts_type(&"t".repeat(100)));
}

#[test]
fn file_names_of_a_series() {
    let plain = Template::parse("d/{feed}.jsonl", 0).unwrap();
    let a = plain.series("a", "t").unwrap();
    assert_eq!(a.dir, Path::new("d"));
    assert_eq!(a.path_of("x"), Path::new("d/x"));
    let m = a.classify("a.2026-11-24T08-30-00.123Z.jsonl.gz").unwrap();
    assert_eq!(m.logical, "a.2026-11-24T08-30-00.123Z.jsonl");
    assert_eq!(m.compressed, Some(Compress::Gzip));
    assert_eq!(
        m.stamp,
        Some(at("2026-11-24T08:30:00.123Z").timestamp_millis())
    );
    assert_eq!(m.period, None);
    assert_eq!(a.classify("a.jsonl").unwrap().stamp, None);
    assert!(a.classify("a.jsonl.zst").is_some());
    for other in [
        "b.2026-11-24T08-30-00.123Z.jsonl",
        "a.jsonl.1",
        "a.2026-11-24T08-30-00.123Z.jsonl.1",
        "a.2026-11-24T08-30-00Z.jsonl",
        "a.2026-11-24T08-30-00.123Z.txt",
        "a.2026-13-24T08-30-00.123Z.jsonl",
        "xa.jsonl",
        "a.jsonl.gz.tmp",
    ] {
        assert_eq!(a.classify(other), None, "{other}");
    }
    assert_eq!(
        rotated_name("d/a.jsonl", ".jsonl", "2026-11-24T08-30-00.123Z"),
        "d/a.2026-11-24T08-30-00.123Z.jsonl"
    );
    // Without an extension the stamp goes at the end.
    let bare = Template::parse("events", 0).unwrap();
    let s = bare.series("a", "t").unwrap();
    assert_eq!(s.dir, Path::new("."));
    assert_eq!(s.path_of("events"), Path::new("events"));
    assert!(s
        .classify("events.2026-11-24T08-30-00.123Z")
        .is_some_and(|m| m.stamp.is_some()));
    let abs = Template::parse("/srv/x.jsonl", 0).unwrap();
    assert_eq!(
        abs.series("a", "t").unwrap().path_of("y"),
        Path::new("/srv/y")
    );

    let daily = Template::parse("d/{feed}-%Y-%m-%d.jsonl", 0).unwrap();
    let s = daily.series("a", "t").unwrap();
    let day = |d: &str| Some(at(&format!("{d}T00:00:00Z")).naive_utc());
    assert_eq!(
        s.classify("a-2026-11-24.jsonl").unwrap().period,
        day("2026-11-24")
    );
    let m = s
        .classify("a-2026-11-24.2026-11-24T08-30-00.123Z.jsonl.zst")
        .unwrap();
    assert_eq!(m.period, day("2026-11-24"));
    assert!(m.stamp.is_some());
    for other in [
        "a-2026-11-4.jsonl",
        "a-2026-11-24x.jsonl",
        "b-2026-11-24.jsonl",
    ] {
        assert_eq!(s.classify(other), None, "{other}");
    }
    assert_eq!(s.period_at(at("2026-11-24T13:14:15Z")), day("2026-11-24"));
    let mut times = Vec::new();
    let now = at("2026-11-24T13:14:15Z");
    for f in daily.formats.iter() {
        times.push(format_time(now, f).unwrap());
    }
    assert_eq!(s.active_path(&times), "d/a-2026-11-24.jsonl");

    assert_eq!(period_index(at("2026-11-24T23:59:59Z"), 86400) + 1, {
        period_index(at("2026-11-25T00:00:00Z"), 86400)
    });
    assert_eq!(
        period_index(at("2026-11-24T08:00:00Z"), 3600),
        period_index(at("2026-11-24T08:59:59.999Z"), 3600)
    );
}

/// The test the issue asks for: a steady stream through size rotation loses no event and
/// splits none between files, and every closed file respects the bound.
#[test]
fn size_rotation_under_a_steady_stream() {
    const MAX: u64 = 2000;
    let root = tempfile::tempdir().unwrap();
    for policy in [FsyncPolicy::Always, FsyncPolicy::Never] {
        let dir = root.path().join(format!("{policy:?}"));
        // A clock that stands still: rotations in the same millisecond still get
        // distinct names that sort in order.
        let (clock, _now) = manual_clock("2026-11-24T08:30:00Z");
        let mut sink = rotating_sink(&dir, "{feed}.jsonl", clock, |c| {
            c.fsync = policy;
            c.rotate_size = Some(ByteSize(MAX));
        });
        let mut next = HashMap::from([("a", 0u64), ("b", 0u64)]);
        let mut sent = 0;
        let mut round = 0u64;
        while sent < 3000 {
            round += 1;
            let size = (round * 7 % 23 + 1) as usize;
            let batch: Vec<_> = (0..size)
                .map(|i| {
                    let feed = if (round + i as u64) % 3 == 0 {
                        "b"
                    } else {
                        "a"
                    };
                    let seq = next.get_mut(feed).unwrap();
                    *seq += 1;
                    // One event larger than a whole file.
                    let len = if *seq == 500 {
                        5000
                    } else {
                        (*seq * 37 % 300) as usize
                    };
                    event(feed, "t", *seq, &"x".repeat(len))
                })
                .collect();
            sent += batch.len();
            sink.write(&batch).unwrap();
            if round % 10 == 0 {
                sink.tick().unwrap();
            }
        }
        sink.flush().unwrap();
        for (feed, last) in next {
            let series = sink.template.series(feed, "t").unwrap();
            let mut rotated: Vec<String> = names(&dir)
                .into_iter()
                .filter(|n| series.classify(n).is_some_and(|m| m.stamp.is_some()))
                .collect();
            rotated.sort();
            assert!(
                rotated.len() > 20,
                "{feed}: only {} rotations",
                rotated.len()
            );
            let mut seqs = Vec::new();
            for name in &rotated {
                let bytes = content(&dir.join(name));
                let events = decode_all(&bytes, name);
                assert!(
                    bytes.len() as u64 <= MAX || events.len() == 1,
                    "{name}: {} bytes in {} events",
                    bytes.len(),
                    events.len()
                );
                seqs.extend(events.iter().map(|e| e.seq));
            }
            let active = format!("{feed}.jsonl");
            let bytes = content(&dir.join(&active));
            assert!(bytes.len() as u64 <= MAX);
            seqs.extend(decode_all(&bytes, &active).iter().map(|e| e.seq));
            assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "{policy:?} {feed}");
        }
    }
}

#[test]
fn retention_deletes_only_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::create_dir_all(dir).unwrap();
    // Files that are not rotated files of `a.jsonl` are never touched.
    let bystanders = [
        "a.jsonl.1",
        "a.2020-01-01T00-00-00.000Z.txt",
        "b.2020-01-01T00-00-00.000Z.jsonl",
        "other.jsonl",
        "notes",
    ];
    for name in bystanders {
        std::fs::write(dir.join(name), "keep me\n").unwrap();
    }
    let (clock, now) = manual_clock("2026-11-24T08:30:00Z");
    let mut sink = rotating_sink(dir, "{feed}.jsonl", clock.clone(), |c| {
        c.fsync = FsyncPolicy::Never;
        c.rotate_size = Some(ByteSize(1000));
        c.max_files = Some(3);
    });
    let all: Vec<_> = (1..=300)
        .map(|i| event("a", "t", i, "0123456789"))
        .collect();
    for (i, batch) in all.chunks(10).enumerate() {
        set(&now, &format!("2026-11-24T08:{:02}:00Z", 30 + i));
        sink.write(batch).unwrap();
    }
    sink.wait_for_maintenance();
    let series = sink.template.series("a", "t").unwrap();
    let rotated: Vec<String> = names(dir)
        .into_iter()
        .filter(|n| series.classify(n).is_some_and(|m| m.stamp.is_some()))
        .collect();
    assert_eq!(rotated.len(), 3, "{:?}", names(dir));
    // What is left is the newest part of the stream, without a hole.
    let mut seqs = Vec::new();
    for name in rotated.iter().chain([&"a.jsonl".to_string()]) {
        seqs.extend(seqs_of(&dir.join(name)));
    }
    let first = seqs[0];
    assert!(first > 1);
    assert_eq!(seqs, (first..=300).collect::<Vec<_>>());
    for name in bystanders {
        assert_eq!(
            std::fs::read(dir.join(name)).unwrap(),
            b"keep me\n",
            "{name}"
        );
    }
    drop(sink);

    // max_age: files last modified longer ago than that go, whatever their number.
    let (clock, now) = manual_clock("2026-11-24T08:30:00Z");
    *now.lock().unwrap() = Utc::now() + chrono::TimeDelta::hours(2);
    let mut sink = rotating_sink(dir, "{feed}.jsonl", clock, |c| {
        c.rotate_size = Some(ByteSize(1000));
        c.max_age = Some(Duration::from_secs(3600));
    });
    sink.write(&[event("a", "t", 301, "x")]).unwrap();
    sink.wait_for_maintenance();
    let mut expected: Vec<String> = bystanders.iter().map(|s| s.to_string()).collect();
    expected.push("a.jsonl".into());
    expected.sort();
    assert_eq!(names(dir), expected);
    assert_eq!(seqs_of(&dir.join("a.jsonl")).last(), Some(&301));

    // A file rotated now is young: it stays, and the minute check runs from `tick`.
    *now.lock().unwrap() = Utc::now();
    let big = "y".repeat(1000);
    sink.write(&[event("a", "t", 302, &big)]).unwrap();
    sink.tick().unwrap();
    sink.wait_for_maintenance();
    assert_eq!(names(dir).len(), expected.len() + 1);
    *now.lock().unwrap() = Utc::now() + chrono::TimeDelta::hours(2);
    sink.tick().unwrap();
    sink.wait_for_maintenance();
    assert_eq!(names(dir), expected);
}

fn seqs_of(path: &Path) -> Vec<u64> {
    decode_all(&content(path), &path.display().to_string())
        .iter()
        .map(|e| e.seq)
        .collect()
}

#[test]
fn interval_rotation_at_utc_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (clock, now) = manual_clock("2026-11-24T08:59:59.500Z");
    let mut sink = rotating_sink(dir, "events.jsonl", clock, |c| {
        c.rotate_interval = Some(Duration::from_secs(3600));
    });
    sink.write(&[event("f", "t", 1, "a")]).unwrap();
    // The first write after the boundary rotates first.
    set(&now, "2026-11-24T09:00:00.250Z");
    sink.write(&[event("f", "t", 2, "b")]).unwrap();
    set(&now, "2026-11-24T09:59:59Z");
    sink.write(&[event("f", "t", 3, "c")]).unwrap();
    sink.tick().unwrap();
    assert_eq!(
        names(dir),
        ["events.2026-11-24T09-00-00.250Z.jsonl", "events.jsonl"]
    );
    assert_eq!(
        seqs(&dir.join("events.2026-11-24T09-00-00.250Z.jsonl")),
        [1]
    );
    // Without writes, the check about once a second rotates.
    set(&now, "2026-11-24T10:00:00.100Z");
    sink.tick().unwrap();
    assert_eq!(
        names(dir),
        [
            "events.2026-11-24T09-00-00.250Z.jsonl",
            "events.2026-11-24T10-00-00.100Z.jsonl"
        ]
    );
    assert_eq!(
        seqs(&dir.join("events.2026-11-24T10-00-00.100Z.jsonl")),
        [2, 3]
    );
    set(&now, "2026-11-24T11:30:00Z");
    sink.tick().unwrap(); // nothing open, nothing to do
    sink.write(&[event("f", "t", 4, "d")]).unwrap();
    assert_eq!(seqs(&dir.join("events.jsonl")), [4]);
    assert_eq!(names(dir).len(), 3);
    drop(sink);

    // A file last written in an earlier interval is rotated before the first write.
    let old = at("2026-11-24T11:30:00Z");
    File::options()
        .write(true)
        .open(dir.join("events.jsonl"))
        .unwrap()
        .set_modified(old.into())
        .unwrap();
    let (clock, _now) = manual_clock("2026-11-24T12:00:05Z");
    let mut sink = rotating_sink(dir, "events.jsonl", clock, |c| {
        c.rotate_interval = Some(Duration::from_secs(3600));
    });
    sink.write(&[event("f", "t", 5, "e")]).unwrap();
    assert_eq!(
        seqs(&dir.join("events.2026-11-24T12-00-05.000Z.jsonl")),
        [4]
    );
    assert_eq!(seqs(&dir.join("events.jsonl")), [5]);
}

#[test]
fn strftime_paths_start_a_file_per_period() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (clock, now) = manual_clock("2026-11-24T23:59:59Z");
    let mut sink = rotating_sink(dir, "{feed}-%Y-%m-%d.jsonl", clock, |c| {
        c.compress = Compress::Zstd;
        c.max_files = Some(2);
    });
    let first = [event("f", "t", 1, "one"), event("f", "t", 2, "two")];
    sink.write(&first).unwrap();
    sink.wait_for_maintenance();
    assert_eq!(names(dir), ["f-2026-11-24.jsonl"]);
    // Past midnight the check closes the day's file and the helper compresses it.
    set(&now, "2026-11-25T00:00:01Z");
    sink.tick().unwrap();
    sink.wait_for_maintenance();
    assert_eq!(names(dir), ["f-2026-11-24.jsonl.zst"]);
    assert_eq!(
        content(&dir.join("f-2026-11-24.jsonl.zst")),
        encoded(&first)
    );
    for (seq, day) in [(3, 25), (4, 26), (5, 27), (6, 28)] {
        set(&now, &format!("2026-11-{day}T12:00:00Z"));
        sink.write(&[event("f", "t", seq, "x")]).unwrap();
    }
    sink.wait_for_maintenance();
    assert_eq!(
        names(dir),
        [
            "f-2026-11-26.jsonl.zst",
            "f-2026-11-27.jsonl.zst",
            "f-2026-11-28.jsonl"
        ]
    );
    assert_eq!(seqs_of(&dir.join("f-2026-11-27.jsonl.zst")), [5]);
}

#[test]
fn strftime_and_size_rotation_together() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (clock, now) = manual_clock("2026-11-24T10:00:00Z");
    let mut sink = rotating_sink(dir, "e-%Y-%m-%d.jsonl", clock, |c| {
        c.rotate_size = Some(ByteSize(300));
        c.max_files = Some(5);
    });
    let mut seq = 0;
    for day in [24, 25] {
        set(&now, &format!("2026-11-{day}T10:00:00Z"));
        for _ in 0..4 {
            seq += 1;
            sink.write(&[event("f", "t", seq, &"z".repeat(150))])
                .unwrap();
        }
    }
    sink.wait_for_maintenance();
    // Each event fills a file: per day three rotated files and the day's file. Of the
    // seven closed files the five newest stay; within a day, the day's file (the last
    // one written) is the newest.
    assert_eq!(names(dir).len(), 6, "{:?}", names(dir));
    assert!(names(dir).contains(&"e-2026-11-24.jsonl".to_string()));
    assert!(names(dir).contains(&"e-2026-11-25.jsonl".to_string()));
    let series = sink.template.series("f", "t").unwrap();
    let mut kept: Vec<(Option<NaiveDateTime>, i64, String)> = names(dir)
        .into_iter()
        .map(|n| {
            let m = series.classify(&n).unwrap();
            (m.period, m.stamp.unwrap_or(i64::MAX), n)
        })
        .collect();
    kept.sort();
    let seqs: Vec<u64> = kept
        .iter()
        .flat_map(|(_, _, n)| seqs_of(&dir.join(n)))
        .collect();
    assert_eq!(seqs, [3, 4, 5, 6, 7, 8]);
}

#[test]
fn compressed_files_hold_exactly_the_original() {
    for codec in [Compress::Gzip, Compress::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let (clock, now) = manual_clock("2026-11-24T08:00:00Z");
        let mut sink = rotating_sink(dir, "{feed}.jsonl", clock, |c| {
            c.rotate_size = Some(ByteSize(64 * 1024));
            c.compress = codec;
        });
        let all: Vec<_> = (1..=2000)
            .map(|i| event("a", "t", i, &format!("{i:0>90}")))
            .collect();
        for (i, batch) in all.chunks(100).enumerate() {
            set(&now, &format!("2026-11-24T08:00:{i:02}Z"));
            sink.write(batch).unwrap();
        }
        sink.wait_for_maintenance();
        let listing = names(dir);
        let (packed, plain): (Vec<_>, Vec<_>) =
            listing.iter().partition(|n| n.ends_with(codec.suffix()));
        assert!(packed.len() >= 3, "{listing:?}");
        assert_eq!(plain, ["a.jsonl"], "{listing:?}");
        let mut restored = Vec::new();
        for name in packed.iter().chain(plain.iter()) {
            restored.extend(content(&dir.join(name)));
        }
        assert_eq!(restored, encoded(&all), "{codec:?}");

        // Directly: the copy keeps the original's modification time, and a stop leaves
        // no copy.
        let src = dir.join("a.jsonl");
        let modified = at("2026-01-02T03:04:05Z");
        File::options()
            .write(true)
            .open(&src)
            .unwrap()
            .set_modified(modified.into())
            .unwrap();
        let tmp = dir.join("copy.tmp");
        assert!(compress_to(&src, &tmp, codec, &AtomicBool::new(false)).unwrap());
        assert!(same_content(&src, &tmp, codec).unwrap());
        let copy_time: DateTime<Utc> = std::fs::metadata(&tmp).unwrap().modified().unwrap().into();
        assert_eq!(copy_time, modified);
        assert!(!compress_to(&src, &tmp, codec, &AtomicBool::new(true)).unwrap());
        std::fs::write(&tmp, b"not compressed").unwrap();
        assert!(!same_content(&src, &tmp, codec).unwrap_or(false));
    }
}

#[test]
fn leftovers_of_a_crash_are_cleaned_up_without_losing_data() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::create_dir_all(dir).unwrap();
    let line = |seq| encoded(&[event("e", "t", seq, "payload")]);
    let stop = AtomicBool::new(false);
    // Crashed between the rename and the delete: a complete copy and the original.
    let done = dir.join("e.2026-11-24T08-00-00.000Z.jsonl");
    std::fs::write(&done, line(1)).unwrap();
    assert!(compress_to(&done, &with_suffix(&done, ".gz"), Compress::Gzip, &stop).unwrap());
    // A name clash with different contents: both stay.
    let clash = dir.join("e.2026-11-24T09-00-00.000Z.jsonl");
    std::fs::write(&clash, line(2)).unwrap();
    let other = dir.join("elsewhere");
    std::fs::write(&other, line(99)).unwrap();
    assert!(compress_to(&other, &with_suffix(&clash, ".gz"), Compress::Gzip, &stop).unwrap());
    std::fs::remove_file(&other).unwrap();
    // Crashed while compressing: a partial temporary file.
    let partial = dir.join("e.2026-11-24T10-00-00.000Z.jsonl");
    std::fs::write(&partial, line(3)).unwrap();
    std::fs::write(with_suffix(&partial, ".gz.tmp"), b"\x1f\x8b partial").unwrap();

    let (clock, _now) = manual_clock("2026-11-24T11:00:00Z");
    let mut sink = rotating_sink(dir, "e.jsonl", clock, |c| {
        c.rotate_size = Some(ByteSize(1 << 20));
        c.compress = Compress::Gzip;
    });
    sink.write(&[event("e", "t", 4, "payload")]).unwrap();
    sink.wait_for_maintenance();
    assert_eq!(
        names(dir),
        [
            "e.2026-11-24T08-00-00.000Z.jsonl.gz",
            "e.2026-11-24T09-00-00.000Z.jsonl",
            "e.2026-11-24T09-00-00.000Z.jsonl.gz",
            "e.2026-11-24T10-00-00.000Z.jsonl.gz",
            "e.jsonl",
        ]
    );
    assert_eq!(seqs_of(&with_suffix(&done, ".gz")), [1]);
    assert_eq!(seqs_of(&clash), [2]);
    assert_eq!(seqs_of(&with_suffix(&partial, ".gz")), [3]);
}

#[test]
fn the_helper_leaves_files_in_use_alone() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (clock, _now) = manual_clock("2026-11-24T11:00:00Z");
    let template = Template::parse(&format!("{}/e.jsonl", dir.display()), 0).unwrap();
    let series = template.series("f", "t").unwrap();
    let rotated = series.path_of("e.2026-11-24T08-00-00.000Z.jsonl");
    std::fs::write(&rotated, encoded(&[event("f", "t", 1, "x")])).unwrap();
    let worker = Worker {
        name: "archive".into(),
        compress: Compress::Zstd,
        max_files: None,
        max_age: None,
        clock,
        stop: Arc::new(AtomicBool::new(false)),
        claims: Arc::new(Mutex::new(Claims::default())),
    };
    lock(&worker.claims).in_use.insert(rotated.clone());
    worker.sweep(&series);
    assert_eq!(names(dir), ["e.2026-11-24T08-00-00.000Z.jsonl"]);
    lock(&worker.claims).in_use.clear();
    worker.sweep(&series);
    assert_eq!(names(dir), ["e.2026-11-24T08-00-00.000Z.jsonl.zst"]);
    assert!(lock(&worker.claims).claimed.is_empty());

    // And the sink does not open a file the helper has claimed.
    let path = format!("{}/e.jsonl", dir.display());
    let mut cfg = FileSinkConfig::new(path.as_str());
    cfg.rotate_size = Some(ByteSize(1000));
    cfg.compress = Compress::Gzip;
    let mut sink = FileSink::build("archive", &cfg).unwrap();
    let claims = sink.maintenance.as_ref().unwrap().claims.clone();
    lock(&claims).claimed.insert(PathBuf::from(&path));
    let err = sink
        .write(&[event("f", "t", 2, "y")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("being compressed or deleted"), "{err}");
    lock(&claims).claimed.clear();
    sink.write(&[event("f", "t", 2, "y")]).unwrap();
    assert_eq!(seqs(Path::new(&path)), [2]);
}

#[test]
fn reopen_after_an_external_rename_starts_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut sink = sink_in(dir, "events.jsonl", FsyncPolicy::Never);
    sink.write(&[event("f", "t", 1, "a"), event("f", "t", 2, "b")])
        .unwrap();
    // logrotate's `create` mode renames the file away...
    std::fs::rename(dir.join("events.jsonl"), dir.join("events.jsonl.1")).unwrap();
    // ...while the sink still writes to it, until told to reopen.
    sink.write(&[event("f", "t", 3, "c")]).unwrap();
    sink.reopen().unwrap();
    sink.write(&[event("f", "t", 4, "d")]).unwrap();
    assert_eq!(seqs(&dir.join("events.jsonl.1")), [1, 2, 3]);
    assert_eq!(seqs(&dir.join("events.jsonl")), [4]);
    // Reopening without a rename continues the same file.
    sink.reopen().unwrap();
    sink.write(&[event("f", "t", 5, "e")]).unwrap();
    assert_eq!(seqs(&dir.join("events.jsonl")), [4, 5]);
    assert!(sink.files.values().all(|f| f.len > 0));
}

#[test]
fn a_failed_batch_undoes_its_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (clock, _now) = manual_clock("2026-11-24T08:00:00Z");
    let mut sink = rotating_sink(dir, "{feed}/{type}.jsonl", clock, |c| {
        c.rotate_size = Some(ByteSize(300));
        c.max_files = Some(100);
    });
    sink.write(&[event("f", "a", 1, &"1".repeat(100))]).unwrap();
    let a = dir.join("f/a.jsonl");
    let before = std::fs::read(&a).unwrap();
    let in_the_way = dir.join("f/b.jsonl");
    std::fs::create_dir(&in_the_way).unwrap();
    let mut batch: Vec<_> = (2..=10)
        .map(|i| event("f", "a", i, &"1".repeat(100)))
        .collect();
    batch.push(event("f", "b", 11, "blocked"));
    for _ in 0..2 {
        let err = sink.write(&batch).unwrap_err().to_string();
        assert!(err.contains(&in_the_way.display().to_string()), "{err}");
        assert_eq!(names(&dir.join("f")), ["a.jsonl", "b.jsonl"]);
        assert_eq!(std::fs::read(&a).unwrap(), before);
    }
    std::fs::remove_dir(&in_the_way).unwrap();
    sink.write(&batch).unwrap();
    sink.wait_for_maintenance();
    let mut seqs_a = Vec::new();
    let listing = names(&dir.join("f"));
    assert!(listing.len() > 4, "{listing:?}");
    for name in listing.iter().filter(|n| n.starts_with("a.")) {
        let path = dir.join("f").join(name);
        assert!(std::fs::metadata(&path).unwrap().len() <= 300);
        seqs_a.extend(seqs(&path));
    }
    assert_eq!(seqs_a, (1..=10).collect::<Vec<_>>());
    assert_eq!(seqs(&dir.join("f/b.jsonl")), [11]);
    let m = sink.maintenance.as_ref().unwrap();
    assert!(lock(&m.claims)
        .in_use
        .iter()
        .all(|p| !p.to_string_lossy().contains("T08")));
}

#[test]
fn rotated_names_sort_by_age_when_the_clock_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (clock, now) = manual_clock("2026-11-24T10:00:00Z");
    let configure = |c: &mut FileSinkConfig| c.rotate_size = Some(ByteSize(10));
    let mut sink = rotating_sink(dir, "e.jsonl", clock.clone(), configure);
    sink.write(&[event("f", "t", 1, "a")]).unwrap();
    sink.write(&[event("f", "t", 2, "b")]).unwrap();
    set(&now, "2026-11-24T09:00:00Z");
    sink.write(&[event("f", "t", 3, "c")]).unwrap();
    drop(sink);
    // A restart with the clock behind: the names on disk are taken into account.
    let mut sink = rotating_sink(dir, "e.jsonl", clock, configure);
    sink.write(&[event("f", "t", 4, "d")]).unwrap();
    assert_eq!(
        names(dir),
        [
            "e.2026-11-24T10-00-00.000Z.jsonl",
            "e.2026-11-24T10-00-00.001Z.jsonl",
            "e.2026-11-24T10-00-00.002Z.jsonl",
            "e.jsonl"
        ]
    );
    let order: Vec<u64> = names(dir).iter().flat_map(|n| seqs(&dir.join(n))).collect();
    assert_eq!(order, [1, 2, 3, 4]);
}

/// Events `range` of feed `f`, types alternating `a`/`b`, ids `id-SEQ`.
fn mixed(range: std::ops::RangeInclusive<u64>) -> Vec<Arc<Event>> {
    range
        .map(|n| event("f", if n % 2 == 0 { "a" } else { "b" }, n, &format!("d{n}")))
        .collect()
}

#[test]
fn re_fetched_events_are_dropped_per_file_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let template = "{feed}/{type}.jsonl";
    let mut sink = sink_in(dir.path(), template, FsyncPolicy::Always);
    sink.feed_started("f", "http://x/", 0, "");
    sink.write(&mixed(1..=10)).unwrap();
    // A crash in the middle of a batch: `b` got 11 and 13, `a` did not get 12.
    sink.write(&[event("f", "b", 11, "d11"), event("f", "b", 13, "d13")])
        .unwrap();
    drop(sink);

    // The feed resumes from its checkpoint at 4: 5..=20 come again.
    let mut sink = sink_in(dir.path(), template, FsyncPolicy::Always);
    sink.feed_started("f", "http://x/", 4, "id-4");
    for chunk in mixed(5..=20).chunks(3) {
        sink.write(chunk).unwrap();
    }
    let a = seqs(&dir.path().join("f/a.jsonl"));
    let b = seqs(&dir.path().join("f/b.jsonl"));
    assert_eq!(a, (1..=20).filter(|n| n % 2 == 0).collect::<Vec<_>>());
    assert_eq!(b, [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]);
    // Copies: 6, 8 and 10 in `a` (12 was missing, and is stored now), 5 to 13 in `b`.
    assert_eq!(sink.counters.get(), 3 + 5);
    // Once past the window, nothing is filtered.
    assert!(sink.windows.is_empty());
}

#[test]
fn a_feed_started_from_the_beginning_is_judged_by_its_first_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = sink_in(dir.path(), "{feed}.jsonl", FsyncPolicy::Always);
    sink.feed_started("f", "http://x/", 0, "");
    sink.write(&mixed(1..=5)).unwrap();
    drop(sink);
    // A crash before the first checkpoint: the feed starts over from the beginning, and the
    // server sends the same stream again. What the files hold is not stored twice.
    let mut sink = sink_in(dir.path(), "{feed}.jsonl", FsyncPolicy::Always);
    sink.feed_started("f", "http://x/", 0, "");
    sink.write(&mixed(1..=2)).unwrap();
    sink.write(&mixed(3..=7)).unwrap();
    assert_eq!(
        seqs(&dir.path().join("f.jsonl")),
        (1..=7).collect::<Vec<_>>()
    );
    assert_eq!(sink.counters.get(), 5);
    assert!(sink.windows.is_empty());

    // The checkpoint was reset and the server sends other events (same ids, other data, as
    // a server that restarted its own numbering would): they are new, and all stored.
    let mut sink = sink_in(dir.path(), "{feed}.jsonl", FsyncPolicy::Always);
    sink.feed_started("f", "http://x/", 0, "");
    let other: Vec<Arc<Event>> = (1..=3)
        .map(|n| {
            event(
                "f",
                if n % 2 == 0 { "a" } else { "b" },
                n,
                &format!("new{n}"),
            )
        })
        .collect();
    sink.write(&other).unwrap();
    assert_eq!(
        seqs(&dir.path().join("f.jsonl")),
        [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    );
    assert_eq!(sink.counters.get(), 0);

    // A stream without ids opens no window either.
    let mut sink = sink_in(dir.path(), "{feed}.jsonl", FsyncPolicy::Always);
    sink.feed_started("f", "http://x/", 0, "");
    sink.write(&[Arc::new(Event::new("f", "b", "", "new1", 1))])
        .unwrap();
    assert_eq!(seqs(&dir.path().join("f.jsonl")).len(), 11);
    assert_eq!(sink.counters.get(), 0);
}

#[test]
fn a_server_that_sends_other_events_is_a_gap_and_stops_the_dropping() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    crate::state::StateStore::open(&state).unwrap();
    let path = format!("{}/{{feed}}.jsonl", dir.path().display());
    let cfg = config(&path, FsyncPolicy::Always);
    let mut sink = FileSink::build_with_state("archive", &cfg, Some(&state)).unwrap();
    sink.write(&mixed(1..=6)).unwrap();
    drop(sink);
    let mut sink = FileSink::build_with_state("archive", &cfg, Some(&state)).unwrap();
    sink.feed_started("f", "http://x/", 3, "id-3");
    // The server's stream after id-3 is another one: event 6 has another id.
    let other: Vec<Arc<Event>> = (4..=8)
        .map(|n| {
            Arc::new(Event::new(
                "f",
                "a",
                &format!("other-{n}"),
                format!("o{n}"),
                n,
            ))
        })
        .collect();
    sink.write(&other).unwrap();
    let stored: Vec<(u64, String)> = read_events(&dir.path().join("f.jsonl"))
        .iter()
        .map(|e| (e.seq, e.id.to_string()))
        .collect();
    let ids: Vec<&str> = stored.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(
        ids,
        ["id-1", "id-2", "id-3", "id-4", "id-5", "id-6", "other-6", "other-7", "other-8"]
    );
    let gaps = crate::state::StateStore::open(&state)
        .unwrap()
        .list_gaps(None)
        .unwrap();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0].reason, crate::state::GapReason::ReplayMismatch);
    assert_eq!(gaps[0].seq, 6);
    assert!(gaps[0].detail.contains("other-6"), "{}", gaps[0].detail);
}

#[test]
fn a_failed_batch_is_filtered_the_same_way_when_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = sink_in(dir.path(), "{feed}.jsonl", FsyncPolicy::Always);
    sink.write(&mixed(1..=6)).unwrap();
    drop(sink);
    let mut sink = sink_in(dir.path(), "{feed}.jsonl", FsyncPolicy::Always);
    sink.feed_started("f", "http://x/", 2, "id-2");
    let batch = mixed(3..=9);
    let filtered = sink.filter_stored(&batch).unwrap();
    // Not applied (as if the write failed): the same batch again gives the same answer.
    let again = sink.filter_stored(&batch).unwrap();
    assert_eq!(filtered.kept.len(), again.kept.len());
    sink.write(&batch).unwrap();
    assert_eq!(
        seqs(&dir.path().join("f.jsonl")),
        (1..=9).collect::<Vec<_>>()
    );
}

#[test]
fn only_an_unsynced_file_can_pull_the_feed_back() {
    let dir = tempfile::tempdir().unwrap();
    for (policy, expect) in [
        (FsyncPolicy::Always, None),
        (FsyncPolicy::Never, Some(6)),
        (FsyncPolicy::Interval, Some(6)),
    ] {
        let dir = dir.path().join(format!("{policy:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut sink = sink_in(&dir, "{feed}/{type}.jsonl", policy);
        sink.write(&mixed(1..=6)).unwrap();
        // The highest of the series (`b` ends at 5, `a` at 6): a type written long ago must
        // not pull the feed back.
        assert_eq!(
            sink.cursor("f").unwrap().map(|c| c.seq),
            expect,
            "{policy:?}"
        );
        assert_eq!(sink.cursor("other").unwrap(), None);
    }
}

#[test]
fn files_of_another_numbering_drop_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let template = "{feed}/{type}.jsonl";
    let mut sink = sink_in(dir.path(), template, FsyncPolicy::Always);
    // An earlier numbering, an hour ago: type `x` up to seq 100.
    let old: Vec<Arc<Event>> = (1..=100)
        .map(|n| {
            let mut e = Event::new("f", "x", &format!("old-{n}"), "o", n);
            e.received_at = Utc::now() - chrono::Duration::hours(1);
            Arc::new(e)
        })
        .collect();
    sink.write(&old).unwrap();
    // The checkpoint was reset: a new numbering, type `a`, 1..=5, then a crash.
    sink.feed_started("f", "http://x/", 0, "");
    let new: Vec<Arc<Event>> = (1..=5)
        .map(|n| event("f", "a", n, &format!("n{n}")))
        .collect();
    sink.write(&new).unwrap();
    drop(sink);

    // Resumes after id-3: the `x` file's seq 100 is not this numbering.
    let mut sink = sink_in(dir.path(), template, FsyncPolicy::Always);
    sink.feed_started("f", "http://x/", 3, "id-3");
    let again: Vec<Arc<Event>> = (4..=10)
        .map(|n| event("f", if n <= 5 { "a" } else { "x" }, n, "d"))
        .collect();
    sink.write(&again).unwrap();
    assert_eq!(seqs(&dir.path().join("f/a.jsonl")), [1, 2, 3, 4, 5]);
    let x = seqs(&dir.path().join("f/x.jsonl"));
    assert_eq!(&x[100..], [6, 7, 8, 9, 10], "the new x events are stored");
    assert_eq!(sink.counters.get(), 2, "only 4 and 5 were copies");

    // A stream without ids, or a resume point the files do not hold, opens no window.
    let mut sink = sink_in(dir.path(), template, FsyncPolicy::Always);
    sink.feed_started("f", "http://x/", 3, "");
    assert!(sink.windows.is_empty());
    sink.feed_started("f", "http://x/", 3, "id-999");
    assert!(sink.windows.is_empty());
}
