use super::*;
use crate::index::{RouteAction, SvcKey};
use crate::objects::Kind;
use crate::testing::{service_yaml, slice_yaml, split_yaml};

struct Fixture {
    dir: tempfile::TempDir,
    index: Arc<Mutex<Index>>,
    errors: ConfigErrors,
    source: DirSource,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = Arc::new(Mutex::new(Index::new("cluster.local")));
    let errors = ConfigErrors::default();
    let source = DirSource::new(dir.path(), index.clone(), errors.clone());
    Fixture {
        dir,
        index,
        errors,
        source,
    }
}

impl Fixture {
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write");
        std::fs::canonicalize(&p).expect("canonical")
    }

    fn services(&self) -> Vec<String> {
        let m = self.index.lock().expect("lock").model();
        m.services.keys().map(|k| k.to_string()).collect()
    }

    fn weights(&self) -> Vec<u32> {
        weights_of(&self.index)
    }
}

/// The weights of the first route of Service default/reviews.
fn weights_of(index: &Mutex<Index>) -> Vec<u32> {
    let m = index.lock().expect("lock").model();
    match &m.services[&SvcKey::new("default", "reviews")].ports[0].routes[0].action {
        RouteAction::Forward(b) => b.iter().map(|b| b.weight).collect(),
        other => panic!("{other:?}"),
    }
}

/// The HTTPRoute splitting Service reviews between v1 and v2.
fn reviews_route(v1: u32, v2: u32) -> String {
    split_yaml(
        "default",
        "reviews",
        "reviews",
        9080,
        &[("reviews-v1", v1), ("reviews-v2", v2)],
    )
}

fn good_files(f: &Fixture) -> PathBuf {
    f.write(
        "services.yaml",
        &[
            service_yaml("default", "reviews", "10.96.0.10", &[("http", 9080)]),
            service_yaml("default", "reviews-v1", "10.96.0.11", &[("http", 9080)]),
            service_yaml("default", "reviews-v2", "10.96.0.12", &[("http", 9080)]),
        ]
        .join("---\n"),
    );
    f.write(
        "nested/dir/slice.yml",
        &slice_yaml("default", "reviews-v1", "http", 8080, &["10.0.0.1"]),
    );
    f.write(".hidden.yaml", "this: [is not read");
    f.write("notes.txt", "not a manifest");
    f.write("route.yaml", &reviews_route(90, 10))
}

#[test]
fn reads_multi_document_files_recursively() {
    let mut f = fixture();
    good_files(&f);
    f.source.load_all().expect("load");
    assert_eq!(
        f.services(),
        vec![
            "default/reviews",
            "default/reviews-v1",
            "default/reviews-v2"
        ]
    );
    assert_eq!(f.weights(), vec![90, 10]);
    assert!(f.errors.all().is_empty(), "{:?}", f.errors.all());
    let counts = f.index.lock().expect("lock").counts();
    assert_eq!(counts[&Kind::EndpointSlice], 1);
}

#[test]
fn a_malformed_manifest_among_good_ones() {
    let mut f = fixture();
    let route = good_files(&f);
    f.source.load_all().expect("load");
    // A second file: one good Service, one with a bad port, one that is not YAML of an object.
    f.write(
        "more.yaml",
        &[
            service_yaml("default", "ratings", "10.96.0.20", &[("http", 9080)]),
            "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: [{port: eighty}]}\n".to_string(),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n".to_string(),
        ]
        .join("---\n"),
    );
    // The route gets a bad weight: its last good version must stay.
    std::fs::write(
        &route,
        reviews_route(90, 10).replace("weight: 10", "weight: 2000000"),
    )
    .expect("write");
    f.source.load_all().expect("load");

    assert!(
        f.services().contains(&"default/ratings".to_string()),
        "good documents are served"
    );
    assert!(!f.services().contains(&"default/broken".to_string()));
    assert_eq!(f.weights(), vec![90, 10], "last good route kept");
    let errs = f.errors.all();
    let summary: Vec<(String, usize, String)> = errs
        .iter()
        .map(|e| {
            (
                Path::new(&e.source)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string(),
                e.document,
                e.field.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("more.yaml".into(), 2, "spec.ports[0].port".into()),
            ("more.yaml".into(), 3, "kind".into()),
            (
                "route.yaml".into(),
                1,
                "spec.rules[0].backendRefs[1].weight".into()
            ),
        ]
    );
    assert!(
        errs[2]
            .reason
            .contains("invalid weight 2000000 for backend reviews-v2"),
        "{}",
        errs[2].reason
    );
    assert_eq!(
        errs[0].to_string().split(": ").nth(1),
        Some("field spec.ports[0].port")
    );

    // Fixing the file clears its error and applies the new version.
    std::fs::write(&route, reviews_route(0, 100)).expect("write");
    f.source.reload(&route);
    assert_eq!(f.weights(), vec![0, 100]);
    assert_eq!(f.errors.all().len(), 2);
}

#[test]
fn broken_yaml_keeps_the_whole_file() {
    let mut f = fixture();
    let route = good_files(&f);
    f.source.load_all().expect("load");
    std::fs::write(&route, "apiVersion: [unclosed\n").expect("write");
    f.source.reload(&route);
    assert_eq!(f.weights(), vec![90, 10]);
    let errs = f.errors.all();
    assert_eq!(errs.len(), 1);
    assert!(errs[0].reason.starts_with("invalid YAML"), "{errs:?}");
}

#[test]
fn deleting_a_file_or_a_document_deletes_its_objects() {
    let mut f = fixture();
    good_files(&f);
    f.source.load_all().expect("load");
    let services = f.write(
        "services.yaml",
        &service_yaml("default", "reviews", "10.96.0.10", &[("http", 9080)]),
    );
    f.source.reload(&services);
    assert_eq!(f.services(), vec!["default/reviews"]);
    std::fs::remove_file(&services).expect("rm");
    f.source.reload(&services);
    assert!(f.services().is_empty());
    // A directory removed as a whole is noticed by the rescan.
    std::fs::remove_dir_all(f.dir.path().join("nested")).expect("rm");
    f.source.load_all().expect("load");
    assert_eq!(
        f.index.lock().expect("lock").counts()[&Kind::EndpointSlice],
        0
    );
}

#[test]
fn an_object_defined_twice_is_reported_and_handed_over() {
    let mut f = fixture();
    let a = f.write(
        "a.yaml",
        &service_yaml("default", "reviews", "10.96.0.10", &[("http", 9080)]),
    );
    f.write(
        "b.yaml",
        &service_yaml("default", "reviews", "10.96.0.99", &[("http", 9080)]),
    );
    f.source.load_all().expect("load");
    let errs = f.errors.all();
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].source.ends_with("b.yaml") && errs[0].reason.contains("already defined in"),
        "{errs:?}"
    );
    // a.yaml goes: b.yaml's version takes over.
    std::fs::remove_file(&a).expect("rm");
    f.source.reload(&a);
    let m = f.index.lock().expect("lock").model();
    assert_eq!(
        m.services[&SvcKey::new("default", "reviews")].cluster_ip,
        Some("10.96.0.99".parse().expect("ip"))
    );
    assert!(f.errors.all().is_empty());
}

#[tokio::test]
async fn watch_follows_edits_live() {
    let f = fixture();
    let route = good_files(&f);
    let index = f.index.clone();
    let mut rx = index.lock().expect("lock").subscribe();
    let _handle = f.source.watch().expect("watch");
    assert_eq!(index.lock().expect("lock").model().services.len(), 3);
    rx.borrow_and_update();
    std::fs::write(&route, reviews_route(50, 50)).expect("write");
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while weights_of(&index) != vec![50, 50] {
            rx.changed().await.expect("index alive");
        }
    })
    .await
    .expect("the edit reached the index");
}

#[tokio::test]
async fn configmap_volume_updates_are_followed() {
    // A ConfigMap volume: route.yaml -> ..data/route.yaml, ..data -> ..2026_a; an update
    // writes ..2026_b and swaps the ..data link.
    let f = fixture();
    good_files(&f);
    let root = f.dir.path();
    std::fs::remove_file(root.join("route.yaml")).expect("rm");
    let a = root.join("..2026_a");
    std::fs::create_dir(&a).expect("mkdir");
    std::fs::write(a.join("route.yaml"), reviews_route(90, 10)).expect("write");
    std::os::unix::fs::symlink("..2026_a", root.join("..data")).expect("link");
    std::os::unix::fs::symlink("..data/route.yaml", root.join("route.yaml")).expect("link");
    let index = f.index.clone();
    let mut rx = index.lock().expect("lock").subscribe();
    let errors = f.errors.clone();
    let _handle = f.source.watch().expect("watch");
    assert_eq!(weights_of(&index), vec![90, 10]);
    assert!(
        errors.all().is_empty(),
        "files in hidden directories are not read twice: {:?}",
        errors.all()
    );
    rx.borrow_and_update();

    let b = root.join("..2026_b");
    std::fs::create_dir(&b).expect("mkdir");
    std::fs::write(b.join("route.yaml"), reviews_route(0, 100)).expect("write");
    std::os::unix::fs::symlink("..2026_b", root.join("..data_tmp")).expect("link");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    std::fs::remove_dir_all(&a).expect("rm old");
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while weights_of(&index) != vec![0, 100] {
            rx.changed().await.expect("index alive");
        }
    })
    .await
    .expect("the swapped ConfigMap content applies");
    assert!(errors.all().is_empty(), "{:?}", errors.all());
}

#[test]
fn an_object_moving_between_files_never_leaves_the_index() {
    let mut f = fixture();
    let a = f.write(
        "a.yaml",
        &[
            service_yaml("default", "reviews", "10.96.0.10", &[("http", 9080)]),
            service_yaml("default", "ratings", "10.96.0.11", &[("http", 9080)]),
        ]
        .join("---\n"),
    );
    let b = f.write("b.yaml", "");
    f.source.load_all().expect("load");
    let rx = f.index.lock().expect("lock").subscribe();
    let before = *rx.borrow();
    // reviews moves from a.yaml to b.yaml; both files change in one group of events.
    f.write(
        "a.yaml",
        &service_yaml("default", "ratings", "10.96.0.11", &[("http", 9080)]),
    );
    f.write(
        "b.yaml",
        &service_yaml("default", "reviews", "10.96.0.10", &[("http", 9080)]),
    );
    let event = |p: &Path| {
        Ok(
            notify::Event::new(notify::EventKind::Modify(notify::event::ModifyKind::Any))
                .add_path(p.to_path_buf()),
        )
    };
    f.source.on_events(vec![event(&a), event(&b)]);
    assert_eq!(
        *rx.borrow(),
        before + 1,
        "one index update for the whole group, so no revision lacks reviews"
    );
    assert_eq!(f.services(), vec!["default/ratings", "default/reviews"]);
    assert!(f.errors.all().is_empty(), "{:?}", f.errors.all());
}

/// Mutated manifests (flipped, dropped and inserted bytes, cut files) through the whole read
/// path: parsing, validation and the index. Whatever arrives, nothing panics and every refusal
/// names a source. A seeded generator keeps failures reproducible.
#[test]
fn mutated_manifests_never_panic() {
    let seed_docs = [
        service_yaml("default", "reviews", "10.96.0.10", &[("http", 9080)]),
        slice_yaml("default", "reviews", "http", 8080, &["10.0.0.1"]),
        split_yaml("default", "r", "reviews", 9080, &[("a", 90), ("b", 10)]),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\nspec:\n  parentRefs: [{group: '', kind: Service, name: s}]\n  rules:\n  - matches: [{method: {service: a.B, method: C, type: RegularExpression}, headers: [{name: x, value: '.*', type: RegularExpression}]}]\n    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 1}, fraction: {numerator: 1, denominator: 3}}}]\n".to_string(),
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {targetRefs: [{kind: Service, name: s}], rules: [{from: [{namespaces: [a]}]}]}\n".to_string(),
    ];
    let alphabet: &[u8] = b" \n:-[]{}'\"#&*!|>%@`,?0123456789abcdefxyzKNS.\\/\t";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut index = Index::new("cluster.local");
    for round in 0..3000 {
        let base = &seed_docs[(next() % seed_docs.len() as u64) as usize];
        let mut bytes = base.clone().into_bytes();
        for _ in 0..(1 + next() % 4) {
            let at = (next() % (bytes.len() as u64 + 1)) as usize;
            match next() % 4 {
                0 if at < bytes.len() => {
                    bytes[at] = alphabet[(next() % alphabet.len() as u64) as usize]
                }
                1 if at < bytes.len() => {
                    bytes.remove(at);
                }
                2 => bytes.insert(at, alphabet[(next() % alphabet.len() as u64) as usize]),
                _ => bytes.truncate(at),
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        let source = format!("round-{round}.yaml");
        match parse_file(&text, &source) {
            Ok(docs) => {
                for doc in docs {
                    match doc.result {
                        Ok(obj) => {
                            let _ = index.apply(obj);
                        }
                        Err((_, err)) => assert_eq!(err.source, source),
                    }
                }
            }
            Err(err) => assert_eq!(err.source, source),
        }
        if round % 100 == 0 {
            index.model();
        }
    }
    // Whatever was accepted also translates.
    let mut translator = crate::xds::translate::Translator::new(index.model());
    for (transparent, scoped) in [(false, false), (true, false), (true, true)] {
        translator.view(&crate::xds::translate::ProxyId {
            namespace: "default".into(),
            name: "p".into(),
            settings: crate::xds::translate::ListenerSettings {
                transparent,
                scoped,
                ..Default::default()
            },
        });
    }
}

#[test]
fn file_events_settle_into_one_change() {
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, ModifyKind, RenameMode};
    use notify::{Event, EventKind};
    let t0 = tokio::time::Instant::now();
    let ms = |n: u64| t0 + std::time::Duration::from_millis(n);
    let ev = |kind: EventKind, path: &str| Ok(Event::new(kind).add_path(PathBuf::from(path)));
    let read = |p: &Path| p.extension().is_some_and(|e| e == "yaml");
    let modified = EventKind::Modify(ModifyKind::Data(DataChange::Any));
    let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));

    // An atomic rename alone: 2 ms after it.
    let mut g = Settle::new(t0, true);
    g.saw(
        &ev(
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            "/d/r.yaml",
        ),
        t0,
        &read,
    );
    assert_eq!(g.deadline(), ms(2));

    // A write in place that stalls between truncating and writing: open until closed.
    let mut g = Settle::new(t0, true);
    g.saw(&ev(modified, "/d/r.yaml"), t0, &read);
    assert_eq!(
        g.deadline(),
        ms(100),
        "a manifest open for writing keeps the group open"
    );
    g.saw(&ev(modified, "/d/r.yaml"), ms(30), &read);
    g.saw(&ev(closed, "/d/r.yaml"), ms(31), &read);
    assert_eq!(g.deadline(), ms(33), "closed: 2 ms of quiet");
    // An event seen late (a busy thread) never moves the end back.
    g.saw(
        &ev(EventKind::Create(CreateKind::File), "/d/s.yaml"),
        ms(1),
        &read,
    );
    assert_eq!(g.deadline(), ms(33), "created, not written: nothing open");
    // A file the source does not read (a swap file, a log) holds nothing back.
    g.saw(&ev(modified, "/d/.r.yaml.swp"), ms(32), &read);
    g.saw(&ev(modified, "/d/app.log"), ms(32), &read);
    assert_eq!(g.deadline(), ms(34));

    // Where the watch reports no closes, quiet alone ends it.
    let mut g = Settle::new(t0, false);
    g.saw(&ev(modified, "/d/r.yaml"), t0, &read);
    assert_eq!(g.deadline(), ms(2));

    // A directory written to without pause ends at 100 ms all the same.
    let mut g = Settle::new(t0, true);
    for n in 0..200 {
        g.saw(&ev(modified, "/d/x.yaml"), ms(n), &read);
        g.saw(&ev(closed, "/d/x.yaml"), ms(n), &read);
    }
    assert_eq!(g.deadline(), ms(100));
    // A watch error ends nothing early and opens nothing.
    let mut g = Settle::new(t0, true);
    g.saw(&Err(notify::Error::generic("lost")), t0, &read);
    assert_eq!(g.deadline(), ms(2));
}
