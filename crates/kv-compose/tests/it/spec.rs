//! Specs, configs (one line, JSON, TOML), the registry and the role checks.

use kv_compose::{ComposeError, MethodSpec, PipelineSpec, build_layers, lookup, plan, registry};
use kv_core::{KvShape, RopeConfig, RopeConvention};

#[test]
fn one_line_pipelines_parse_and_print_back() {
    let line = "snapkv:ratio=0.5,window=64|kivi:bits=2,group=32,residual=128|evicted=kivi:bits=2";
    let p = PipelineSpec::parse_line(line).expect("parse");
    assert_eq!(p.stages.len(), 2);
    assert_eq!(p.stages[0].name, "snapkv");
    assert_eq!(p.stages[0].ratio, Some(0.5));
    assert_eq!(p.stages[0].params["window"], "64");
    assert_eq!(p.stages[1].params["residual"], "128");
    assert_eq!(p.evicted.as_ref().map(|e| e.name.as_str()), Some("kivi"));
    assert_eq!(p.to_line(), line);
    assert_eq!(
        PipelineSpec::parse_line("full").expect("parse"),
        PipelineSpec::single(MethodSpec::full())
    );
}

#[test]
fn json_and_toml_round_trip() {
    let p = PipelineSpec::new(vec![
        MethodSpec::new("adakv")
            .with_ratio(0.75)
            .with("scorer", "snapkv"),
        MethodSpec::new("kivi").with("bits", 4).with("group", 32),
    ])
    .with_evicted(MethodSpec::new("kivi").with("bits", 2));
    let json = p.to_json();
    assert_eq!(PipelineSpec::from_json(&json).expect("json"), p);
    let toml = p.to_toml().expect("toml");
    assert_eq!(PipelineSpec::from_toml(&toml).expect("toml"), p, "{toml}");
    // Numbers and booleans are accepted as parameter values.
    let typed = r#"{"version": 1, "stages": [{"name": "snapkv", "ratio": 0.5,
        "params": {"window": 64, "gqa": "mean"}}, {"name": "kivi", "params": {"bits": 2}}]}"#;
    let q = PipelineSpec::from_json(typed).expect("typed json");
    assert_eq!(q.stages[0].params["window"], "64");
    assert_eq!(
        q.to_line(),
        "snapkv:ratio=0.5,gqa=mean,window=64|kivi:bits=2"
    );
    let toml = "version = 1\n[[stages]]\nname = \"snapkv\"\nratio = 0.5\n[stages.params]\n\
                window = 64\ngqa = \"mean\"\n[[stages]]\nname = \"kivi\"\n[stages.params]\nbits = 2\n";
    assert_eq!(PipelineSpec::from_toml(toml).expect("toml text"), q);
}

#[test]
fn bad_configs_point_at_the_offending_field() {
    let err = |r: Result<PipelineSpec, ComposeError>| r.expect_err("must fail").to_string();
    let e = err(PipelineSpec::from_json(
        r#"{"version": 2, "stages": [{"name": "full"}]}"#,
    ));
    assert!(e.contains("version: 2"), "{e}");
    let e = err(PipelineSpec::from_json(
        r#"{"version": 1,
            "stages": [{"name": "full", "bits": 2}]}"#,
    ));
    assert!(e.contains("line 2") && e.contains("bits"), "{e}");
    let e = err(PipelineSpec::from_json(r#"{"version": 1, "stages": []}"#));
    assert!(e.contains("stages"), "{e}");
    let e = err(PipelineSpec::from_json(
        r#"{"version": 1, "stages": [{"name": "full"}, {"name": "snapkv", "ratio": 1.5}]}"#,
    ));
    assert!(e.contains("stages[1]") && e.contains("ratio"), "{e}");
    let e = err(PipelineSpec::from_toml("version = 1\nstages = 3\n"));
    assert!(e.contains("TOML") && e.contains("stages"), "{e}");
    for bad in [
        "",
        ":ratio=0.5",
        "snapkv:ratio",
        "full|evicted=kivi|evicted=kivi",
    ] {
        assert!(
            matches!(
                PipelineSpec::parse_line(bad),
                Err(ComposeError::Syntax { .. })
            ),
            "{bad}"
        );
    }
    for bad in ["snapkv:ratio=1.0", "snapkv:ratio=-0.1", "snapkv:ratio=abc"] {
        assert!(
            matches!(
                PipelineSpec::parse_line(bad),
                Err(ComposeError::BadParam { .. })
            ),
            "{bad}"
        );
    }
    // Unknown methods list the known ones and say where.
    let e = plan(&PipelineSpec::parse_line("snapkv|nosuch").expect("parse")).expect_err("unknown");
    assert!(matches!(&e, ComposeError::UnknownMethod { at, .. } if at == "stages[1]"));
    assert!(e.to_string().contains("full"), "{e}");
    for (line, param) in [("full:ratio=0.5", "ratio"), ("full:bits=2", "bits")] {
        match lookup(&MethodSpec::parse_stage(line).expect("parse")) {
            Err(ComposeError::BadParam { param: p, .. }) => assert_eq!(p, param),
            other => panic!("{line}: {other:?}"),
        }
    }
}

#[test]
fn stage_orders_that_cannot_work_are_rejected_with_both_names() {
    let conflict = |line: &str| match plan(&PipelineSpec::parse_line(line).expect("parse")) {
        Err(ComposeError::Conflict { stages, reason }) => format!("{stages}: {reason}"),
        other => panic!("{line}: expected a conflict, got {other:?}"),
    };
    let e = conflict("kivi:bits=2|snapkv:ratio=0.5");
    assert!(
        e.contains("stages[0] `kivi` and stages[1] `snapkv`") && e.contains("selection first"),
        "{e}"
    );
    let e = conflict("snapkv|kivi|q8_0");
    assert!(
        e.contains("`kivi`") && e.contains("`q8_0`") && e.contains("codecs"),
        "{e}"
    );
    let e = conflict("snapkv|knorm|kivi");
    assert!(e.contains("one selection"), "{e}");
    let e = conflict("h2o|kivi");
    assert!(e.contains("`h2o`") && e.contains("decode-time"), "{e}");
    let e = conflict("kivi|evicted=kivi:bits=2");
    assert!(e.contains("needs a selection"), "{e}");
    let e = conflict("snapkv:ratio=0.75|think");
    assert!(e.contains("`think`") && e.contains("queries"), "{e}");
    let e = conflict("snapkv|kivi|evicted=knorm");
    assert!(e.contains("must be a codec"), "{e}");
    for ok in [
        "snapkv:ratio=0.75|kivi:bits=4",
        "adakv_snapkv|q4_0",
        "knorm|evicted=kivi:bits=2",
        "snapkv|dense_fp16|evicted=kivi:bits=2",
        "h2o",
        "kivi",
    ] {
        plan(&PipelineSpec::parse_line(ok).expect("parse")).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

/// ThinK + KIVI written as two stages (or the `think_kivi` preset) plans to one KIVI cache
/// that prunes its quantized keys; settings that cannot apply are rejected by name.
#[test]
fn think_then_kivi_fuses_into_pruned_kivi() {
    let alone = |line: &str| match plan(&PipelineSpec::parse_line(line).expect("parse")) {
        Ok(kv_compose::Plan::Alone { spec, .. }) => spec.to_stage_string(),
        other => panic!("{line}: {other:?}"),
    };
    assert_eq!(alone("think|kivi"), "kivi:prune=0.4");
    assert_eq!(
        alone("think:ratio=0.5,window=16|kivi:bits=4"),
        "kivi:bits=4,prune=0.5,prune_window=16"
    );
    assert_eq!(
        alone("think_kivi"),
        "kivi:bits=2,group=32,prune=0.4,residual=128"
    );
    assert_eq!(
        alone("think_kivi:ratio=0.3,window=8,bits=4"),
        "kivi:bits=4,group=32,prune=0.3,prune_window=8,residual=128"
    );
    let conflict = |line: &str| match plan(&PipelineSpec::parse_line(line).expect("parse")) {
        Err(ComposeError::Conflict { stages, reason }) => format!("{stages}: {reason}"),
        other => panic!("{line}: expected a conflict, got {other:?}"),
    };
    let e = conflict("think:recent=8|kivi");
    assert!(e.contains("`recent`") && e.contains("residual"), "{e}");
    let e = conflict("think|kivi:prune=0.2");
    assert!(e.contains("already sets"), "{e}");
    let e = conflict("snapkv:ratio=0.5|kivi:prune=0.4");
    assert!(e.contains("`kivi`") && e.contains("queries"), "{e}");
    let e = conflict("think|kivi|evicted=q4_0");
    assert!(e.contains("evicts no token"), "{e}");
}

#[test]
fn registry_names_are_unique() {
    let reg = registry();
    let mut names: Vec<&str> = reg.iter().map(|e| e.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), reg.len());
}

/// The kv-evict budget methods, H2O and pipelines build from the registry and reject bad
/// parameters with the parameter's name and the stage's location.
#[test]
fn methods_and_pipelines_build_and_name_bad_params() {
    let shape = KvShape::new(1, 2, 4, 8).expect("shape");
    let rope = RopeConfig::new(8, 10_000.0, RopeConvention::RotateHalf);
    let device = kv_testkit::test_device();
    let build = |line: &str| {
        build_layers(
            &PipelineSpec::parse_line(line).expect("parse"),
            3,
            shape,
            &rope,
            &device,
        )
    };
    for ok in [
        "pyramidkv:ratio=0.5,window=8,beta=10",
        "adakv_snapkv:ratio=0.75,alpha_safeguard=0.5",
        "adakv:scorer=knorm,ratio=0.5",
        "adakv:scorer=expected_attention,n_sink=2",
        "adakv",
        "h2o:heavy=0.25,recent=64",
        "h2o:heavy=16,recent=16,gqa=max",
        "snapkv:ratio=0.5,window=4|kivi:bits=4,group=4,residual=8",
        "knorm|dense_fp16|evicted=kivi:bits=2,group=4,residual=4",
        "scissorhands:budget=16",
        "keyformer",
        "coverage:mass=0.8,scorer=knorm|kivi:group=4,residual=8",
        "quest:budget=16,page=4",
        "snapkv:decode_every=8,decode_target=16,window=4",
        "leankv:scorer=knorm,group=4,residual=8",
    ] {
        let caches = build(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(caches.len(), 3, "{ok}");
    }
    for (bad, param, at) in [
        ("pyramidkv:beta=0.5", "beta", "stages[0]"),
        ("pyramidkv:beta=x", "beta", "stages[0]"),
        (
            "adakv_snapkv:alpha_safeguard=1.5",
            "alpha_safeguard",
            "stages[0]",
        ),
        ("adakv:scorer=knorm,window=8", "param", "stages[0]"),
        ("adakv:scorer=nosuch", "method", "stages[0]"),
        ("h2o:heavy=1.5", "heavy", "stages[0]"),
        ("h2o:recent=abc", "recent", "stages[0]"),
        ("h2o:heavy=0,recent=0", "recent", "stages[0]"),
        ("h2o:gqa=median", "gqa", "stages[0]"),
        ("h2o:ratio=0.5,heavy=8", "heavy", "stages[0]"),
        ("adakv_snapkv:scorer=knorm", "scorer", "stages[0]"),
        ("snapkv|kivi:bits=9", "bits", "stages[1]"),
        ("headkv:artefact=/nonexistent", "artefact", "stages[0]"),
        ("quest", "budget", "stages[0]"),
        ("snapkv|kivi:group=5", "group", "stages[1]"),
        (
            "snapkv|kivi:group=4,residual=8|evicted=kivi:group=4,residual=3",
            "group",
            "evicted",
        ),
    ] {
        match build(bad) {
            Err(ComposeError::BadParam {
                param: p, at: a, ..
            }) => {
                assert_eq!((p.as_str(), a.as_str()), (param, at), "{bad}");
            }
            other => panic!("{bad}: expected a bad `{param}` at {at}, got {other:?}"),
        }
    }
    // The shipped HeadKV artefact is SmolLM2's: another model's shape is refused by name.
    let e = build("headkv").expect_err("artefact of another model");
    assert!(e.to_string().contains("headkv"), "{e}");
    // Decode-time re-selection needs the selection's own storage, which a codec replaces.
    match build("snapkv:decode_every=8,decode_target=16|kivi:group=4,residual=8") {
        Err(ComposeError::Conflict { reason, .. }) => {
            assert!(reason.contains("decode"), "{reason}")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[test]
fn presets_expand_to_their_papers_stages() {
    let expand = |line: &str| match plan(&PipelineSpec::parse_line(line).expect("parse")) {
        Ok(kv_compose::Plan::Stack {
            selection,
            kept,
            evicted,
        }) => {
            let mut p = PipelineSpec::new(vec![selection.0, kept.0]);
            p.evicted = evicted.map(|e| e.0);
            p.to_line()
        }
        other => panic!("{line}: {other:?}"),
    };
    assert_eq!(
        expand("minikv"),
        "observed_attention:ratio=0.5,recent=0.25|kivi:bits=2,group=16,residual=128"
    );
    assert_eq!(
        expand("minikv:selection=snapkv"),
        "snapkv:ratio=0.5|kivi:bits=2,group=16,residual=128"
    );
    assert_eq!(
        expand("minikv:ratio=0.75,selection=pyramid,bits=4"),
        "pyramidkv:ratio=0.75|kivi:bits=4,group=16,residual=128"
    );
    assert_eq!(
        expand("mikv"),
        "observed_attention:ratio=0.75|dense_fp16|evicted=kivi:bits=2,group=32,residual=32"
    );
    assert_eq!(
        expand("mikv:high=int8,low_bits=4,ratio=0.5"),
        "observed_attention:ratio=0.5|q8_0|evicted=kivi:bits=4,group=32,residual=32"
    );
    for (bad, param) in [
        ("minikv:selection=random", "selection"),
        ("minikv:bits=two", "bits"),
        ("mikv:high=fp8", "high"),
        ("mikv:window=3", "window"),
        ("leankv:precision=k2v8", "precision"),
    ] {
        match plan(&PipelineSpec::parse_line(bad).expect("parse")) {
            Err(ComposeError::BadParam { param: p, at, .. }) => {
                assert_eq!((p.as_str(), at.as_str()), (param, "stages[0]"), "{bad}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert_eq!(
        expand("leankv"),
        "coverage:mass=0.9,scorer=observed_attention|kivi:group=32,key_bits=8,residual=128,value_bits=4"
    );
    assert_eq!(
        expand("leankv:precision=k4v2,mass=0.8,scorer=snapkv"),
        "coverage:mass=0.8,scorer=snapkv|kivi:group=32,key_bits=4,residual=128,value_bits=2"
    );
    let e = plan(&PipelineSpec::parse_line("minikv|kivi").expect("parse")).expect_err("alone");
    assert!(e.to_string().contains("preset"), "{e}");
}
