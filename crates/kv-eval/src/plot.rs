//! Quality-versus-bytes plots: SVG written by hand, PNG rendered from the SVG with resvg.

use std::fmt::Write as _;

use crate::{EvalError, Result};

/// One named series of `(x, y)` points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points, drawn in order and joined by a line.
    pub points: Vec<(f64, f64)>,
}

/// What to draw.
#[derive(Debug, Clone)]
pub struct Plot {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// The series.
    pub series: Vec<Series>,
    /// A horizontal reference line `(label, y)`, e.g. the full cache's perplexity.
    pub reference: Option<(String, f64)>,
}

const W: f64 = 1000.0;
const H: f64 = 560.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 320.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// Decimals that distinguish consecutive ticks.
fn tick_decimals(ticks: &[f64]) -> usize {
    let step = match ticks {
        [a, b, ..] => (b - a).abs(),
        _ => 1.0,
    };
    if step >= 1.0 {
        0
    } else {
        ((-step.log10()).ceil() as usize + 1).min(6)
    }
}

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= n as f64)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + 1e-9 * span {
        out.push(t);
        t += step;
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Plot {
    /// Renders the plot as an SVG document.
    pub fn to_svg(&self) -> String {
        let pts = self.series.iter().flat_map(|s| s.points.iter().copied());
        let ys = pts
            .clone()
            .map(|p| p.1)
            .chain(self.reference.iter().map(|r| r.1));
        let (mut x0, mut x1) = (0.0f64, pts.clone().map(|p| p.0).fold(0.0, f64::max) * 1.05);
        let (mut y0, mut y1) = ys
            .clone()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
                (a.min(y), b.max(y))
            });
        if !y0.is_finite() {
            (y0, y1) = (0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.08).max(1e-3);
        (y0, y1) = (y0 - pad, y1 + pad);
        if x1 <= x0 {
            (x0, x1) = (0.0, 1.0);
        }
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, sans-serif" font-size="13">"#
        );
        let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = write!(
            s,
            r#"<text x="{}" y="28" font-size="16" font-weight="bold">{}</text>"#,
            LEFT,
            esc(&self.title)
        );
        let xt = nice_ticks(x0, x1, 8);
        let xd = tick_decimals(&xt);
        for t in xt {
            let x = sx(t);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/>"##,
                TOP + ph
            );
            let _ = write!(
                s,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{t:.xd$}</text>"#,
                TOP + ph + 18.0,
            );
        }
        let yt = nice_ticks(y0, y1, 8);
        let yd = tick_decimals(&yt);
        for t in yt {
            let y = sy(t);
            let _ = write!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/>"##,
                LEFT + pw
            );
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{t:.yd$}</text>"#,
                LEFT - 6.0,
                y + 4.0,
            );
        }
        let _ = write!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 18.0,
            esc(&self.x_label)
        );
        let _ = write!(
            s,
            r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        let mut legend_y = TOP + 10.0;
        if let Some((label, y)) = &self.reference {
            let yy = sy(*y);
            let _ = write!(
                s,
                r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#000" stroke-dasharray="6 4"/>"##,
                LEFT + pw
            );
            let _ = write!(
                s,
                r##"<line x1="{:.1}" y1="{legend_y:.1}" x2="{:.1}" y2="{legend_y:.1}" stroke="#000" stroke-dasharray="6 4"/>"##,
                LEFT + pw + 15.0,
                LEFT + pw + 40.0
            );
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                LEFT + pw + 46.0,
                legend_y + 4.0,
                esc(label)
            );
            legend_y += 20.0;
        }
        for (i, ser) in self.series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            // Past the palette, series repeat colours with square markers and dashed lines.
            let second = (i / COLORS.len()) % 2 == 1;
            let dash = if second {
                r#" stroke-dasharray="6 3""#
            } else {
                ""
            };
            let marker = |x: f64, y: f64| {
                if second {
                    format!(
                        r#"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="{c}"/>"#,
                        x - 4.0,
                        y - 4.0
                    )
                } else {
                    format!(r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{c}"/>"#)
                }
            };
            if ser.points.len() > 1 {
                let path: Vec<String> = ser
                    .points
                    .iter()
                    .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                    .collect();
                let _ = write!(
                    s,
                    r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{dash}/>"#,
                    path.join(" ")
                );
            }
            for &(x, y) in &ser.points {
                s.push_str(&marker(sx(x), sy(y)));
            }
            s.push_str(&marker(LEFT + pw + 27.0, legend_y));
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                LEFT + pw + 46.0,
                legend_y + 4.0,
                esc(&ser.name)
            );
            legend_y += 20.0;
        }
        s.push_str("</svg>\n");
        s
    }

    /// Renders the plot to PNG bytes (text uses the system's fonts, DejaVu Sans if present).
    ///
    /// # Errors
    /// [`EvalError::Usage`] if the SVG cannot be parsed or the raster cannot be encoded.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        svg_to_png(&self.to_svg())
    }
}

/// Renders an SVG document to PNG bytes.
///
/// # Errors
/// [`EvalError::Usage`] if the SVG cannot be parsed or the raster cannot be encoded.
pub fn svg_to_png(svg: &str) -> Result<Vec<u8>> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    let tree =
        usvg::Tree::from_str(svg, &opt).map_err(|e| EvalError::Usage(format!("svg: {e}")))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| EvalError::Usage("svg: empty canvas".into()))?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap
        .encode_png()
        .map_err(|e| EvalError::Usage(format!("png: {e}")))
}
