//! Method specs, one-line pipelines and the registry's errors.

use kv_eval::EvalError;
use kv_eval::method::{MethodSpec, lookup, parse_pipeline, registry};

#[test]
fn one_line_pipelines_parse_and_print_back() {
    let p = parse_pipeline("snapkv:ratio=0.5,window=64|kivi:bits=2,group=32,residual=128")
        .expect("parse");
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].name, "snapkv");
    assert_eq!(p[0].ratio, Some(0.5));
    assert_eq!(p[0].params["window"], "64");
    assert_eq!(p[1].params["residual"], "128");
    let line: Vec<String> = p.iter().map(MethodSpec::to_stage_string).collect();
    assert_eq!(
        line.join("|"),
        "snapkv:ratio=0.5,window=64|kivi:bits=2,group=32,residual=128"
    );
    assert_eq!(
        parse_pipeline("full").expect("parse"),
        vec![MethodSpec::full()]
    );
}

#[test]
fn bad_specs_are_rejected_clearly() {
    assert!(matches!(parse_pipeline(""), Err(EvalError::Usage(_))));
    assert!(matches!(
        parse_pipeline(":ratio=0.5"),
        Err(EvalError::Usage(_))
    ));
    assert!(matches!(
        parse_pipeline("snapkv:ratio"),
        Err(EvalError::Usage(_))
    ));
    for bad in ["snapkv:ratio=1.0", "snapkv:ratio=-0.1", "snapkv:ratio=abc"] {
        assert!(
            matches!(parse_pipeline(bad), Err(EvalError::BadParam { .. })),
            "{bad}"
        );
    }
    let e = lookup(&MethodSpec::parse_stage("nosuch").expect("parse")).expect_err("unknown");
    assert!(
        e.to_string().contains("full"),
        "the error lists known methods: {e}"
    );
    let e =
        lookup(&MethodSpec::parse_stage("full:ratio=0.5").expect("parse")).expect_err("no ratio");
    assert!(matches!(e, EvalError::BadParam { .. }));
    let e = lookup(&MethodSpec::parse_stage("full:bits=2").expect("parse")).expect_err("no param");
    assert!(matches!(e, EvalError::BadParam { .. }));
}

#[test]
fn registry_names_are_unique() {
    let reg = registry();
    let mut names: Vec<&str> = reg.iter().map(|e| e.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), reg.len());
}

/// The kv-evict budget methods and H2O build from the registry and reject bad parameters
/// with the parameter's name.
#[test]
fn budget_methods_and_h2o_build_and_name_bad_params() {
    use kv_core::{KvShape, RopeConfig, RopeConvention};
    use kv_eval::method::build_caches;
    let shape = KvShape::new(1, 2, 4, 8).expect("shape");
    let rope = RopeConfig::new(8, 10_000.0, RopeConvention::RotateHalf);
    let device = kv_testkit::test_device();
    let build = |line: &str| {
        build_caches(
            &parse_pipeline(line).expect("parse"),
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
    ] {
        let caches = build(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(caches.len(), 3, "{ok}");
    }
    for (bad, param) in [
        ("pyramidkv:beta=0.5", "beta"),
        ("pyramidkv:beta=x", "beta"),
        ("adakv_snapkv:alpha_safeguard=1.5", "alpha_safeguard"),
        ("adakv:scorer=knorm,window=8", "param"),
        ("adakv:scorer=nosuch", "method"),
        ("h2o:heavy=1.5", "heavy"),
        ("h2o:recent=abc", "recent"),
        ("h2o:heavy=0,recent=0", "recent"),
        ("h2o:gqa=median", "gqa"),
        ("h2o:ratio=0.5", "ratio"),
        ("adakv_snapkv:scorer=knorm", "scorer"),
    ] {
        match build(bad) {
            Err(EvalError::BadParam { param: p, .. }) => assert_eq!(p, param, "{bad}"),
            other => panic!("{bad}: expected a bad `{param}`, got {other:?}"),
        }
    }
}
