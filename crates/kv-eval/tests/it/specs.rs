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
