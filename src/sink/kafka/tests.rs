use super::*;
use std::sync::Mutex;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};

use crate::checkpoint::{FeedTracker, Position};
use crate::sink::BufferConfig;
use crate::sink::{runner, Sink, SinkConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};

use crate::sink::test_event as event;

fn events(feed: &str, range: std::ops::RangeInclusive<u64>) -> Vec<Arc<Event>> {
    range
        .map(|n| {
            event(
                feed,
                "edit",
                n,
                &format!("{{\"n\":{n},\"meta\":{{\"id\":\"m{n}\"}}}}"),
            )
        })
        .collect()
}

fn parse(toml_text: &str) -> KafkaSinkConfig {
    match toml::from_str::<SinkConfig>(toml_text) {
        Ok(SinkConfig::Kafka(c)) => c,
        other => panic!("not a kafka sink: {other:?}"),
    }
}

fn base(extra: &str) -> String {
    format!("type = \"kafka\"\nbrokers = \"localhost:9092\"\ntopic = \"events\"\n{extra}")
}

fn errors(c: &KafkaSinkConfig) -> Vec<(String, String)> {
    c.validate()
}

// --- configuration ---------------------------------------------------------------------

#[test]
fn config_defaults_and_unknown_keys() {
    let c = parse(&base(""));
    assert_eq!(c.key, KeySource::Feed);
    assert_eq!(c.compression, Compression::Lz4);
    assert!(c.idempotence);
    assert_eq!(c.acks, Acks::All);
    assert_eq!(c.on_error, OnError::Block);
    assert_eq!(c.delivery_timeout, Duration::from_secs(30));
    assert!(c.options.is_empty());
    assert!(errors(&c).is_empty(), "{:?}", errors(&c));
    assert!(toml::from_str::<SinkConfig>(&base("topik = \"x\"")).is_err());
    assert!(toml::from_str::<SinkConfig>(&base("compression = \"snappy2\"")).is_err());
    assert!(toml::from_str::<SinkConfig>(&base("on_error = \"ignore\"")).is_err());
    let c = parse(&base(
        "compression = \"zstd\"\non_error = \"skip\"\ndelivery_timeout = \"5s\"\nkey = \"id\"",
    ));
    assert_eq!(
        (c.compression, c.on_error, c.delivery_timeout, c.key.clone()),
        (
            Compression::Zstd,
            OnError::Skip,
            Duration::from_secs(5),
            KeySource::Id
        )
    );
    assert!(errors(&c).is_empty(), "zstd is built in: {:?}", errors(&c));
}

#[test]
fn key_sources() {
    for (text, expected) in [
        ("feed", KeySource::Feed),
        ("id", KeySource::Id),
        ("none", KeySource::None),
        ("/meta/id", KeySource::Pointer("/meta/id".into())),
        ("/a~1b/~0c", KeySource::Pointer("/a~1b/~0c".into())),
    ] {
        assert_eq!(parse(&base(&format!("key = \"{text}\""))).key, expected);
    }
    for bad in ["ID", "meta/id", "", "/a~2"] {
        let err = toml::from_str::<SinkConfig>(&base(&format!("key = \"{bad}\"")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key source") || err.contains("JSON pointer"),
            "{err}"
        );
    }
}

#[test]
fn options_take_text_numbers_booleans_env_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "from-file\n").unwrap();
    std::env::set_var("SSE_BRIDGE_TEST_KAFKA_PW", "from-env");
    let c = parse(&base(&format!(
        "[options]\n\"client.id\" = \"me\"\n\"linger.ms\" = 20\n\"socket.nagle.disable\" = true\n\
         \"sasl.password\" = {{ env = \"SSE_BRIDGE_TEST_KAFKA_PW\" }}\n\
         \"sasl.username\" = {{ file = \"{}\" }}\n",
        secret.display()
    )));
    assert_eq!(c.options["client.id"], OptionValue::Plain("me".into()));
    assert_eq!(c.options["linger.ms"], OptionValue::Plain("20".into()));
    assert_eq!(
        c.options["socket.nagle.disable"],
        OptionValue::Plain("true".into())
    );
    assert_eq!(
        c.options["sasl.password"],
        OptionValue::Env("SSE_BRIDGE_TEST_KAFKA_PW".into())
    );
    assert!(errors(&c).is_empty(), "{:?}", errors(&c));
    let settings = c.client_config().unwrap();
    let get = |k: &str| {
        settings
            .entries
            .iter()
            .find(|(key, ..)| key == k)
            .map(|(_, v, secret, _)| (v.clone(), *secret))
    };
    assert_eq!(get("sasl.password"), Some(("from-env".into(), true)));
    assert_eq!(get("sasl.username"), Some(("from-file".into(), true)));
    assert_eq!(
        get("client.id"),
        Some(("me".into(), false)),
        "replaces the default"
    );
    assert_eq!(get("acks"), Some(("all".into(), false)));
    assert_eq!(get("enable.idempotence"), Some(("true".into(), false)));
    assert_eq!(get("message.timeout.ms"), Some(("30000".into(), false)));

    for bad in [
        "[options]\nx = { env = \"A\", file = \"b\" }",
        "[options]\nx = { path = \"b\" }",
        "[options]\nx = {}",
        "[options]\nx = [1]",
    ] {
        assert!(toml::from_str::<SinkConfig>(&base(bad)).is_err(), "{bad}");
    }
}

/// librdkafka's own log lines (with `debug = "all"` it prints the configuration) go
/// through the context, which scrubs every secret value, a file's content included.
#[test]
fn librdkafka_log_lines_never_show_secret_values() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "file-secret-42\n").unwrap();
    let c = parse(&base(&format!(
        "[options]\n\"sasl.username\" = {{ file = \"{}\" }}\n\"sasl.password\" = \"pw\"\n",
        file.display()
    )));
    let settings = c.client_config().unwrap();
    let context = Context {
        sink: "k".into(),
        reports: Arc::default(),
        last_error_log: Mutex::new(None),
        secrets: settings.secret_values(),
    };
    let out = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = {
        let out = out.clone();
        move || WriteTo(out.clone())
    };
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(writer)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        context.log(
            RDKafkaLogLevel::Debug,
            "CONF",
            "Client configuration: sasl.username = file-secret-42, sasl.password = pw",
        );
        context.error(
            KafkaError::ClientCreation("x".into()),
            "auth failed for file-secret-42",
        );
    });
    let logged = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("sasl.username = ***"), "{logged}");
    assert!(logged.contains("sasl.password = ***"), "{logged}");
    assert!(!logged.contains("file-secret-42"), "{logged}");
}

struct WriteTo(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for WriteTo {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn secrets_never_show() {
    std::env::set_var("SSE_BRIDGE_TEST_KAFKA_SECRET", "hunter2-env");
    let c = parse(&base(
        "[options]\n\"sasl.password\" = \"hunter2-plain\"\n\
         \"sasl.oauthbearer.client.secret\" = { env = \"SSE_BRIDGE_TEST_KAFKA_SECRET\" }\n",
    ));
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    // librdkafka refuses the value of a property: the message names the key, not the value.
    std::env::set_var("SSE_BRIDGE_TEST_KAFKA_BAD", "sekrit-value");
    let c = parse(&base(
        "[options]\n\"sasl.username\" = \"ok\"\n\"sasl.mechanism\" = \"PLAIN\"\n\
         \"security.protocol\" = { env = \"SSE_BRIDGE_TEST_KAFKA_BAD\" }\n",
    ));
    let errs = errors(&c);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, "options.security.protocol");
    assert!(!errs[0].1.contains("sekrit"), "{errs:?}");
    assert!(errs[0].1.contains("***"), "{errs:?}");
    let Err(e) = KafkaSink::build("k", &c) else {
        panic!("built with a bad option")
    };
    assert!(!e.to_string().contains("sekrit"), "{e}");
    // A plain value of a harmless key is shown, which helps.
    let c = parse(&base(
        "[options]\n\"security.protocol\" = \"carrier-pigeon\"",
    ));
    let errs = errors(&c);
    assert!(errs[0].1.contains("carrier-pigeon"), "{errs:?}");
}

#[test]
fn invalid_settings_name_their_key() {
    let cases = [
        ("brokers = \"\"", "brokers", "at least one broker"),
        ("topic = \"\"", "topic", "must not be empty"),
        (
            "topic = \"a b\"",
            "topic",
            "cannot be part of a Kafka topic name",
        ),
        ("topic = \"a/{feed}\"", "topic", "cannot be part"),
        (
            "topic = \"{feed}.{kind}\"",
            "topic",
            "unknown placeholder `{kind}`",
        ),
        ("topic = \"{feed\"", "topic", "unbalanced `{`"),
        ("topic = \"x}\"", "topic", "unbalanced `}`"),
        ("topic = \"..\"", "topic", "not a valid Kafka topic name"),
        ("acks = \"leader\"", "acks", "idempotent producer"),
        ("delivery_timeout = \"0s\"", "delivery_timeout", "between"),
        (
            "[options]\n\"bootstrap.servers\" = \"x\"",
            "options.bootstrap.servers",
            "`brokers`",
        ),
        ("[options]\n\"ACKS\" = \"0\"", "options.ACKS", "`acks`"),
        (
            "[options]\n\"transactional.id\" = \"t\"",
            "options.transactional.id",
            "transactions",
        ),
        (
            "[options]\n\"no.such.property\" = \"1\"",
            "options.no.such.property",
            "No such configuration property",
        ),
        (
            "[options]\n\"linger.ms\" = \"soon\"",
            "options.linger.ms",
            "Invalid value",
        ),
        (
            "[options]\n\"sasl.password\" = { env = \"SSE_BRIDGE_TEST_NO_SUCH_VAR\" }",
            "options.sasl.password",
            "`SSE_BRIDGE_TEST_NO_SUCH_VAR` is not set",
        ),
        (
            "[options]\n\"sasl.password\" = { file = \"/nonexistent/secret\" }",
            "options.sasl.password",
            "cannot read /nonexistent/secret",
        ),
    ];
    for (extra, key, words) in cases {
        let text = if extra.starts_with("brokers") || extra.starts_with("topic") {
            let field = extra.split(' ').next().unwrap_or_default();
            base("")
                .lines()
                .filter(|l| !l.starts_with(field))
                .chain([extra])
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            base(extra)
        };
        let c = parse(&text);
        let errs = errors(&c);
        assert!(
            errs.iter().any(|(k, m)| k == key && m.contains(words)),
            "{extra}: expected `{key}`: {words:?} in {errs:?}"
        );
    }
    let long = format!("topic = \"{}\"", "x".repeat(250));
    assert!(
        errors(&parse(&base("").replace("topic = \"events\"", &long)))
            .iter()
            .any(|(k, m)| k == "topic" && m.contains("too long"))
    );
    // With {feed}, room is kept for a feed name of 100 characters.
    let feedy = format!("topic = \"{}.{{feed}}\"", "x".repeat(148));
    assert!(errors(&parse(&base("").replace("topic = \"events\"", &feedy))).is_empty());
    let feedy = format!("topic = \"{}.{{feed}}\"", "x".repeat(149));
    assert!(!errors(&parse(&base("").replace("topic = \"events\"", &feedy))).is_empty());
    // Kerberos is not built in; SCRAM is (with OpenSSL).
    let c = parse(&base("[options]\n\"sasl.mechanism\" = \"GSSAPI\""));
    let errs = errors(&c);
    assert!(
        errs.iter()
            .any(|(k, m)| k == "options.sasl.mechanism" && m.contains("not available")),
        "{errs:?}"
    );
    let c = parse(&base("[options]\n\"sasl.mechanism\" = \"SCRAM-SHA-512\""));
    assert!(errors(&c).is_empty(), "{:?}", errors(&c));
    let c = parse(&base("[options]\n\"sasl.mechanism\" = \"PLAIN\""));
    assert!(errors(&c).is_empty(), "{:?}", errors(&c));
    let c = parse(&base("acks = \"leader\"\nidempotence = false"));
    assert!(errors(&c).is_empty(), "{:?}", errors(&c));
}

#[test]
fn accepted_types() {
    let typed = parse(&base("").replace("\"events\"", "\"sse.{feed}.{type}\""));
    for ok in ["message", "edit", "log.v2", "a-b_c", "A9", &"x".repeat(144)] {
        assert!(typed.accepts_type(ok), "{ok}");
    }
    for bad in [
        "",
        "a/b",
        "sp ace",
        "caf\u{e9}",
        "a:b",
        "{feed}",
        &"x".repeat(145),
    ] {
        assert!(!typed.accepts_type(bad), "{bad:?}");
    }
    let alone = parse(&base("").replace("\"events\"", "\"{type}\""));
    assert!(alone.accepts_type("x"));
    assert!(alone.accepts_type(".x"));
    assert!(!alone.accepts_type("."));
    assert!(!alone.accepts_type(".."));
    assert!(alone.accepts_type(&"x".repeat(249)));
    assert!(!alone.accepts_type(&"x".repeat(250)));
    let untyped = parse(&base("").replace("\"events\"", "\"{feed}\""));
    assert!(untyped.accepts_type("../../anything at all"));
    assert!(SinkConfig::Kafka(typed).accepts_type("edit"));
}

// --- against librdkafka's mock cluster ---------------------------------------------------

fn mock() -> MockCluster<'static, DefaultProducerContext> {
    MockCluster::new(1).expect("mock cluster")
}

/// `security.protocol = "SSL"` with a private CA: librdkafka (built with OpenSSL) verifies
/// the broker's certificate and sends its first Kafka request inside the TLS session. The
/// broker here is a TLS listener that reads that request; Kafka tests over plaintext cover
/// the rest (tansu has no TLS).
#[test]
fn ssl_reaches_the_broker_through_a_verified_tls_session() {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(cert.der())
    };
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    );
    std::fs::write(&ca, pem).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        key_pair.serialize_der(),
    ));
    let server = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(server).unwrap(), tcp);
        let mut head = [0u8; 6];
        let read = std::io::Read::read_exact(&mut tls, &mut head).map(|()| head);
        let _ = tx.send(read.map_err(|e| e.to_string()));
    });
    let c = parse(&format!(
        "type = \"kafka\"\nbrokers = \"127.0.0.1:{port}\"\ntopic = \"t\"\n\
         [options]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = {:?}\n",
        ca.display().to_string()
    ));
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    let sink = KafkaSink::build("k", &c).unwrap();
    let head = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("librdkafka connected")
        .expect("a verified TLS session carrying a request");
    // A Kafka request: its size (4 bytes), then the API key; a client starts with
    // ApiVersions (18).
    assert_eq!(i16::from_be_bytes([head[4], head[5]]), 18, "{head:?}");
    drop(sink);
}

fn mock_config(mock: &MockCluster<'_, DefaultProducerContext>, extra: &str) -> KafkaSinkConfig {
    let timeout = if extra.contains("delivery_timeout") {
        ""
    } else {
        "delivery_timeout = \"3s\"\n"
    };
    let text = format!(
        "type = \"kafka\"\nbrokers = \"{}\"\ntopic = \"t-{{type}}\"\n{timeout}{extra}",
        mock.bootstrap_servers()
    );
    let c = parse(&text);
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    c
}

/// Every record of `topic` (partition 0), read until nothing new arrives.
fn read(
    mock: &MockCluster<'_, DefaultProducerContext>,
    topic: &str,
) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", "test")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&list).unwrap();
    let mut out = Vec::new();
    let mut idle = Instant::now();
    while idle.elapsed() < Duration::from_millis(1500) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            out.push(m.detach());
            idle = Instant::now();
        }
    }
    out
}

fn seqs(records: &[rdkafka::message::OwnedMessage]) -> Vec<u64> {
    records
        .iter()
        .map(|m| {
            let h = m.headers().expect("headers");
            let seq = h
                .iter()
                .find(|h| h.key == "sse-seq")
                .and_then(|h| h.value)
                .expect("sse-seq");
            String::from_utf8_lossy(seq).parse().expect("numeric seq")
        })
        .collect()
}

#[test]
fn records_carry_data_key_headers_and_timestamp() {
    let mock = mock();
    mock.create_topic("t-edit", 1, 1).unwrap();
    let mut sink = KafkaSink::build("k", &mock_config(&mock, "key = \"/meta/id\"")).unwrap();
    let mut batch = events("wiki", 1..=3);
    batch.push(event("wiki", "edit", 4, "not json"));
    sink.write(&batch).unwrap();
    let records = read(&mock, "t-edit");
    assert_eq!(seqs(&records), [1, 2, 3, 4]);
    let first = &records[0];
    assert_eq!(first.payload(), Some(batch[0].data.as_bytes()));
    assert_eq!(first.key(), Some(&b"m1"[..]));
    assert_eq!(
        records[3].key(),
        None,
        "no key when the pointer finds nothing"
    );
    assert_eq!(sink.counters().keys_missing.load(Ordering::Relaxed), 1);
    let headers: Vec<(String, String)> = first
        .headers()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h.key.to_string(),
                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
            )
        })
        .collect();
    let at = batch[0].received_at;
    assert_eq!(
        headers,
        [
            ("sse-feed".to_string(), "wiki".to_string()),
            ("sse-type".into(), "edit".into()),
            ("sse-id".into(), "id-1".into()),
            ("sse-seq".into(), "1".into()),
            (
                "received-at".into(),
                at.to_rfc3339_opts(SecondsFormat::Micros, true)
            ),
        ]
    );
    assert_eq!(
        first.timestamp(),
        rdkafka::Timestamp::CreateTime(at.timestamp_millis())
    );
    assert_eq!(sink.counters().delivered.load(Ordering::Relaxed), 4);
}

#[test]
fn every_compression_round_trips() {
    let mock = mock();
    mock.create_topic("t-edit", 1, 1).unwrap();
    let mut expected = Vec::new();
    for (i, compression) in ["none", "gzip", "lz4", "zstd"].iter().enumerate() {
        let config = mock_config(&mock, &format!("compression = \"{compression}\""));
        let mut sink = KafkaSink::build("k", &config).unwrap();
        let first = 10 * i as u64 + 1;
        sink.write(&events("wiki", first..=first + 2)).unwrap();
        expected.extend(first..=first + 2);
    }
    let records = read(&mock, "t-edit");
    assert_eq!(seqs(&records), expected);
    assert!(records
        .iter()
        .all(|m| m.payload().is_some_and(|p| p.starts_with(b"{\"n\":"))));
}

#[test]
fn keys_by_feed_by_id_or_none() {
    let mock = mock();
    mock.create_topic("t-edit", 1, 1).unwrap();
    for (key, expected) in [
        ("feed", Some(&b"wiki"[..])),
        ("id", Some(&b"id-1"[..])),
        ("none", None),
    ] {
        let mut sink =
            KafkaSink::build("k", &mock_config(&mock, &format!("key = \"{key}\""))).unwrap();
        let e = event("wiki", "edit", 1, "x");
        assert!(sink.render_key(&e) == expected.is_some());
        if let Some(k) = expected {
            assert_eq!(sink.key_buf.as_bytes(), k);
        }
    }
    let mut sink = KafkaSink::build("k", &mock_config(&mock, "key = \"id\"")).unwrap();
    let mut e = (*event("wiki", "edit", 1, "x")).clone();
    e.id = Arc::from("");
    assert!(!sink.render_key(&e), "an empty id means no key");
}

#[test]
fn a_permanent_error_blocks_then_the_retry_succeeds() {
    let mock = mock();
    mock.create_topic("t-edit", 1, 1).unwrap();
    let mut sink = KafkaSink::build("k", &mock_config(&mock, "")).unwrap();
    sink.write(&events("wiki", 1..=2)).unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let batch = events("wiki", 3..=7);
    let err = sink.write(&batch).unwrap_err().to_string();
    assert!(
        err.contains("sink `k`")
            && err.contains("5 of 5 records not delivered")
            && err.contains("topic `t-edit`")
            && err.contains("authorization")
            && err.contains("(permanent)")
            && err.contains("on_error"),
        "{err}"
    );
    assert_eq!(sink.counters().failed.load(Ordering::Relaxed), 5);
    // The runner retries the same batch (librdkafka remembers the topic's error until
    // its next metadata refresh, so the first retries may fail too): it goes through, once.
    let mut attempts = 0;
    while let Err(e) = sink.write(&batch) {
        attempts += 1;
        assert!(attempts < 20, "still failing: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        sink.counters().resent.load(Ordering::Relaxed),
        5 * (attempts + 1)
    );
    assert_eq!(seqs(&read(&mock, "t-edit")), [1, 2, 3, 4, 5, 6, 7]);
}

#[test]
fn transient_produce_errors_are_retried_by_librdkafka() {
    let mock = mock();
    mock.create_topic("t-edit", 1, 1).unwrap();
    let mut sink = KafkaSink::build("k", &mock_config(&mock, "")).unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    sink.write(&events("wiki", 1..=50)).unwrap();
    assert_eq!(sink.counters().failed.load(Ordering::Relaxed), 0);
    let got = seqs(&read(&mock, "t-edit"));
    assert_eq!(
        got,
        (1..=50).collect::<Vec<_>>(),
        "idempotence: no duplicate"
    );
}

#[test]
fn skip_counts_permanent_errors_and_moves_on() {
    let mock = mock();
    mock.create_topic("t-edit", 1, 1).unwrap();
    let mut sink = KafkaSink::build("k", &mock_config(&mock, "on_error = \"skip\"")).unwrap();
    sink.write(&events("wiki", 1..=2)).unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    sink.write(&events("wiki", 3..=5)).unwrap();
    sink.write(&events("wiki", 6..=6)).unwrap();
    let c = sink.counters();
    assert_eq!(c.skipped.load(Ordering::Relaxed), 3);
    assert_eq!(c.delivered.load(Ordering::Relaxed), 3);
    assert_eq!(seqs(&read(&mock, "t-edit")), [1, 2, 6]);
}

#[test]
fn an_invalid_rendered_topic_is_never_sent() {
    let mock = mock();
    mock.create_topic("t-edit", 1, 1).unwrap();
    let batch = vec![
        event("wiki", "edit", 1, "a"),
        event("wiki", "bad/type", 2, "b"),
        event("wiki", "edit", 3, "c"),
    ];
    let mut blocking = KafkaSink::build("k", &mock_config(&mock, "")).unwrap();
    let err = blocking.write(&batch).unwrap_err().to_string();
    assert!(
        err.contains("1 of 3") && err.contains("not a valid Kafka topic name"),
        "{err}"
    );
    // The retry sends only what was not confirmed: the good records are not repeated.
    assert!(blocking.write(&batch).is_err());
    assert_eq!(blocking.counters().resent.load(Ordering::Relaxed), 1);
    assert_eq!(seqs(&read(&mock, "t-edit")), [1, 3]);
    // A different batch is sent whole.
    blocking.write(&[event("wiki", "edit", 4, "d")]).unwrap();

    let mut skipping = KafkaSink::build("k", &mock_config(&mock, "on_error = \"skip\"")).unwrap();
    skipping.write(&batch).unwrap();
    assert_eq!(skipping.counters().skipped.load(Ordering::Relaxed), 1);
    assert_eq!(seqs(&read(&mock, "t-edit")), [1, 3, 4, 1, 3]);
}

#[test]
fn a_broker_down_holds_the_feed_back_until_it_returns() {
    let mock = mock();
    mock.create_topic("t-edit", 1, 1).unwrap();
    let sink = KafkaSink::build("k", &mock_config(&mock, "delivery_timeout = \"1s\"")).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tracker = Arc::new(FeedTracker::new(Position {
            seq: 0,
            last_event_id: Arc::from(""),
        }));
        let give_up = tokio_util::sync::CancellationToken::new();
        let (handle, worker) = runner::spawn(
            "k",
            Box::new(sink),
            &BufferConfig::default(),
            give_up.clone(),
            None,
        )
        .unwrap();
        // Connected and delivering first.
        let first = events("wiki", 1..=10);
        tracker.register(first.iter().map(|e| (e.seq, &e.id, 1)));
        handle.send(first, &tracker).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tracker.acked().seq < 10 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tracker.acked().seq, 10);

        mock.broker_down(1).unwrap();
        let more = events("wiki", 11..=30);
        tracker.register(more.iter().map(|e| (e.seq, &e.id, 1)));
        handle.send(more, &tracker).await;
        // Past the delivery timeout: the batch failed at least once, nothing acknowledged.
        let deadline = Instant::now() + Duration::from_secs(15);
        while handle.health.errors.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(handle.health.errors.load(Ordering::Acquire) >= 1);
        assert!(!handle.health.healthy.load(Ordering::Acquire));
        let error = handle.health.last_error().unwrap_or_default();
        assert!(
            error.contains("timed out") && error.contains("(transient)"),
            "{error}"
        );
        assert_eq!(tracker.acked().seq, 10, "held back, not acknowledged");
        assert_eq!(handle.queued(), 20);

        mock.broker_up(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while tracker.acked().seq < 30 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(tracker.acked().seq, 30, "delivered once the broker is back");
        assert!(handle.health.healthy.load(Ordering::Relaxed));
        drop(handle);
        worker.finished().await;
    });
    let got = seqs(&read(&mock, "t-edit"));
    let mut unique = got.clone();
    unique.dedup();
    assert_eq!(
        unique,
        (1..=30).collect::<Vec<_>>(),
        "every event, in order: {got:?}"
    );
}
