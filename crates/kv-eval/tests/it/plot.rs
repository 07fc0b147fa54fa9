//! The sweep plot renders to SVG and PNG.

use kv_eval::plot::{Plot, Series};

fn plot() -> Plot {
    Plot {
        title: "t <&>".into(),
        x_label: "MiB".into(),
        y_label: "ppl".into(),
        series: vec![
            Series {
                name: "a".into(),
                points: vec![(1.0, 20.8), (2.0, 20.75)],
            },
            Series {
                name: "b".into(),
                points: vec![(0.5, 21.4)],
            },
        ],
        reference: Some(("full".into(), 20.742)),
    }
}

#[test]
fn svg_has_every_series_and_escapes_text() {
    let svg = plot().to_svg();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("t &lt;&amp;&gt;"), "title escaped");
    assert_eq!(
        svg.matches("<circle").count(),
        3 + 2,
        "3 points + 2 legend marks"
    );
    assert_eq!(
        svg.matches("<polyline").count(),
        1,
        "only multi-point series get a line"
    );
    assert!(svg.contains("stroke-dasharray"), "reference line drawn");
}

#[test]
fn png_renders() {
    let png = plot().to_png().expect("render");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 1000);
}
