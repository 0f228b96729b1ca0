//! Inline SVG line and bar charts with axes, ticks, legends and titles.
//!
//! Charts are drawn in a fixed 640-unit-wide `viewBox` and scale to the page width. Every string
//! that goes into the SVG is escaped; hovering a point or bar shows its value via `<title>`
//! (native tooltips, no script). Non-finite values are skipped.

use crate::fmt::{byte_unit, esc, num, BYTE_UNITS};
use std::fmt::Write;

const W: f64 = 640.0;
const PLOT_H: f64 = 190.0;
const ML: f64 = 62.0;
const MR: f64 = 16.0;
const MB: f64 = 44.0;
const PAD_X: f64 = 14.0;

/// Tableau 10: distinguishable, and readable on white.
const PALETTE: [&str; 10] =
    ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

pub(crate) fn color(style: usize) -> &'static str {
    PALETTE[style % PALETTE.len()]
}

/// Past ten series colours repeat, so lines get a dash pattern as well.
fn dash(style: usize) -> &'static str {
    match (style / PALETTE.len()) % 3 {
        0 => "",
        1 => " stroke-dasharray=\"6 3\"",
        _ => " stroke-dasharray=\"2 2\"",
    }
}

/// How the y axis is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Plain,
    /// Byte counts: the axis is in the binary unit that fits the largest value.
    Bytes,
}

pub(crate) struct Point {
    pub x: f64,
    pub y: f64,
    /// Tooltip (plain text; escaped here).
    pub tip: String,
    /// Drawn as an open marker (e.g. a failed or rejected client update).
    pub hollow: bool,
}

pub(crate) struct Line {
    pub name: String,
    pub style: usize,
    pub points: Vec<Point>,
}

pub(crate) struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub unit: Unit,
    pub lines: Vec<Line>,
}

pub(crate) struct Bars {
    pub name: String,
    pub style: usize,
    /// One value per category.
    pub values: Vec<Option<f64>>,
}

pub(crate) struct BarChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub unit: Unit,
    /// Category values (rounds), one per bar group.
    pub categories: Vec<u64>,
    pub bars: Vec<Bars>,
    /// Stack the series instead of grouping them side by side.
    pub stacked: bool,
    /// A series drawn as a dark line with markers over the bars (e.g. total wall time).
    pub overlay: Option<Bars>,
}

#[derive(Clone, Copy)]
enum Swatch {
    Line(usize),
    Bar(usize),
    Overlay,
}

struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    decimals: usize,
}

fn nice_step(raw: f64) -> f64 {
    let e = raw.log10().floor();
    let p = 10f64.powf(e);
    let f = raw / p;
    let n = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    n * p
}

/// Nice ticks covering `[lo, hi]`, about `target` intervals.
fn axis(lo: f64, hi: f64, target: usize) -> Axis {
    let (mut lo, mut hi) = (lo, hi);
    if hi <= lo {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        lo -= pad;
        hi += pad;
    }
    let step = nice_step((hi - lo) / target as f64);
    let t0 = (lo / step).floor();
    let t1 = (hi / step).ceil();
    let ticks: Vec<f64> =
        (0..=((t1 - t0) as i64)).map(|i| (t0 + i as f64) * step).map(|v| if v == 0.0 { 0.0 } else { v }).collect();
    // The fewest decimals that show the step exactly (0.25 → 2, 0.5 → 1, 20 → 0).
    let decimals = (0..8).find(|d| {
        let x = step * 10f64.powi(*d as i32);
        (x - x.round()).abs() < 1e-6 * x.max(1.0)
    });
    let decimals = decimals.unwrap_or(8);
    Axis { lo: t0 * step, hi: t1 * step, ticks, decimals }
}

fn tick_label(v: f64, decimals: usize) -> String {
    if v.abs() >= 1e6 {
        num(v)
    } else {
        format!("{v:.decimals$}")
    }
}

/// Divisor and axis-label suffix for a unit, given the largest absolute value.
fn scale(unit: Unit, max_abs: f64) -> (f64, String) {
    match unit {
        Unit::Plain => (1.0, String::new()),
        Unit::Bytes => {
            let k = byte_unit(max_abs);
            (1024f64.powi(k as i32), format!(" ({})", BYTE_UNITS[k]))
        }
    }
}

/// Legend rows under the title; returns the SVG and the height it takes.
fn legend(items: &[(String, Swatch)], top: f64) -> (String, f64) {
    let mut out = String::new();
    if items.is_empty() {
        return (out, 0.0);
    }
    let (mut x, mut y) = (ML, top + 10.0);
    let max_x = W - MR;
    for (name, sw) in items {
        let shown: String = if name.chars().count() > 28 {
            name.chars().take(27).chain(std::iter::once('…')).collect()
        } else {
            name.clone()
        };
        let wdt = 18.0 + shown.chars().count() as f64 * 6.4 + 14.0;
        if x + wdt > max_x && x > ML {
            x = ML;
            y += 16.0;
        }
        let _ = write!(out, "<g class=\"lg\"><title>{}</title>", esc(name));
        match *sw {
            Swatch::Line(s) => {
                let _ = write!(
                    out,
                    "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"2.5\"{}/>",
                    x,
                    y,
                    x + 14.0,
                    y,
                    color(s),
                    dash(s)
                );
            }
            Swatch::Bar(s) => {
                let _ = write!(
                    out,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"10\" fill=\"{}\"/>",
                    x + 1.0,
                    y - 5.0,
                    color(s)
                );
            }
            Swatch::Overlay => {
                let _ = write!(out, "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#333\" stroke-width=\"1.5\"/><circle cx=\"{:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"#333\"/>", x, x + 14.0, x + 7.0);
            }
        }
        let _ = write!(out, "<text x=\"{:.1}\" y=\"{:.1}\" class=\"lt\">{}</text></g>", x + 18.0, y + 4.0, esc(&shown));
        x += wdt;
    }
    (out, y - top + 10.0)
}

/// The frame shared by both chart kinds: opening tag, title, legend, grid, axes and their labels.
/// Returns the SVG so far and the y of the plot area's top edge.
fn frame(
    title: &str,
    y_label: &str,
    x_label: &str,
    items: &[(String, Swatch)],
    ya: &Axis,
    y_suffix: &str,
) -> (String, f64) {
    let (leg, leg_h) = legend(items, 26.0);
    let top = 26.0 + leg_h + 10.0;
    let h = top + PLOT_H + MB;
    let mut s = String::new();
    let _ = write!(s, "<svg class=\"chart\" viewBox=\"0 0 {W:.0} {h:.0}\" role=\"img\" preserveAspectRatio=\"xMidYMid meet\"><title>{}</title>", esc(title));
    let _ = write!(s, "<text class=\"ct\" x=\"{:.1}\" y=\"17\" text-anchor=\"middle\">{}</text>", W / 2.0, esc(title));
    s.push_str(&leg);
    let bottom = top + PLOT_H;
    for t in &ya.ticks {
        let y = bottom - (t - ya.lo) / (ya.hi - ya.lo) * PLOT_H;
        let _ = write!(s, "<line class=\"gr\" x1=\"{ML:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\"/>", W - MR);
        let _ = write!(
            s,
            "<text class=\"tk\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            ML - 6.0,
            y + 3.5,
            tick_label(*t, ya.decimals)
        );
    }
    let _ = write!(s, "<line class=\"ax\" x1=\"{ML:.1}\" y1=\"{top:.1}\" x2=\"{ML:.1}\" y2=\"{bottom:.1}\"/>");
    let _ = write!(s, "<line class=\"ax\" x1=\"{ML:.1}\" y1=\"{bottom:.1}\" x2=\"{:.1}\" y2=\"{bottom:.1}\"/>", W - MR);
    let _ = write!(
        s,
        "<text class=\"al\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        ML + (W - MR - ML) / 2.0,
        h - 8.0,
        esc(x_label)
    );
    let _ = write!(
        s,
        "<text class=\"al\" transform=\"translate(13 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}{}</text>",
        top + PLOT_H / 2.0,
        esc(y_label),
        esc(y_suffix)
    );
    (s, top)
}

fn y_px(v: f64, ya: &Axis, top: f64) -> f64 {
    top + PLOT_H - (v - ya.lo) / (ya.hi - ya.lo) * PLOT_H
}

/// Integer x ticks (rounds) within `[lo, hi]`, at most about ten.
fn int_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let step = nice_step(((hi - lo) / 10.0).max(1.0)).max(1.0).ceil();
    let first = (lo / step).ceil() * step;
    let mut v = Vec::new();
    let mut t = first;
    while t <= hi + 1e-9 {
        v.push(t);
        t += step;
    }
    v
}

/// A line chart; `None` when there is no finite point to draw.
pub(crate) fn line_chart(c: &LineChart) -> Option<String> {
    let pts = || c.lines.iter().flat_map(|l| l.points.iter()).filter(|p| p.x.is_finite() && p.y.is_finite());
    pts().next()?;
    let (xmin, xmax) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.x), b.max(p.x)));
    let (ymin, ymax) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.y), b.max(p.y)));
    let (div, suffix) = scale(c.unit, ymin.abs().max(ymax.abs()));
    let ya = axis(ymin / div, ymax / div, 5);
    let items: Vec<(String, Swatch)> = if c.lines.len() > 1 || c.lines.first().is_some_and(|l| !l.name.is_empty()) {
        c.lines.iter().filter(|l| !l.name.is_empty()).map(|l| (l.name.clone(), Swatch::Line(l.style))).collect()
    } else {
        Vec::new()
    };
    let (mut s, top) = frame(&c.title, &c.y_label, &c.x_label, &items, &ya, &suffix);
    let bottom = top + PLOT_H;
    let x0 = ML + PAD_X;
    let xw = W - MR - ML - 2.0 * PAD_X;
    let x_px = |x: f64| if xmax > xmin { x0 + (x - xmin) / (xmax - xmin) * xw } else { x0 + xw / 2.0 };
    for t in int_ticks(xmin, xmax) {
        let x = x_px(t);
        let _ =
            write!(s, "<line class=\"ax\" x1=\"{x:.1}\" y1=\"{bottom:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\"/>", bottom + 4.0);
        let _ = write!(
            s,
            "<text class=\"tk\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t:.0}</text>",
            bottom + 16.0
        );
    }
    for l in &c.lines {
        let mut p: Vec<&Point> = l.points.iter().filter(|p| p.x.is_finite() && p.y.is_finite()).collect();
        p.sort_by(|a, b| a.x.total_cmp(&b.x));
        if p.is_empty() {
            continue;
        }
        let col = color(l.style);
        let _ = write!(s, "<g class=\"series\"><title>{}</title>", esc(&l.name));
        if p.len() > 1 {
            let coords: Vec<String> =
                p.iter().map(|q| format!("{:.1},{:.1}", x_px(q.x), y_px(q.y / div, &ya, top))).collect();
            let _ = write!(s, "<polyline fill=\"none\" stroke=\"{col}\" stroke-width=\"2\" stroke-linejoin=\"round\"{} points=\"{}\"/>", dash(l.style), coords.join(" "));
        }
        for q in p {
            let fill = if q.hollow { "#fff" } else { col };
            let _ = write!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{fill}\" stroke=\"{col}\" stroke-width=\"1.5\"><title>{}</title></circle>", x_px(q.x), y_px(q.y / div, &ya, top), esc(&q.tip));
        }
        s.push_str("</g>");
    }
    s.push_str("</svg>");
    Some(s)
}

/// A grouped or stacked bar chart over rounds; `None` when there is no finite value to draw.
pub(crate) fn bar_chart(c: &BarChart, fmt_value: fn(f64) -> String) -> Option<String> {
    let n = c.categories.len();
    let vals = |b: &Bars, i: usize| b.values.get(i).copied().flatten().filter(|v| v.is_finite());
    let any = c.bars.iter().chain(c.overlay.iter()).any(|b| (0..n).any(|i| vals(b, i).is_some()));
    if n == 0 || !any {
        return None;
    }
    let mut max: f64 = 0.0;
    for i in 0..n {
        if c.stacked {
            max = max.max(c.bars.iter().filter_map(|b| vals(b, i)).filter(|v| *v > 0.0).sum());
        } else {
            for b in &c.bars {
                max = max.max(vals(b, i).unwrap_or(0.0));
            }
        }
        if let Some(o) = &c.overlay {
            max = max.max(vals(o, i).unwrap_or(0.0));
        }
    }
    let (div, suffix) = scale(c.unit, max);
    let ya = axis(0.0, if max > 0.0 { max / div } else { 1.0 }, 5);
    let mut items: Vec<(String, Swatch)> = c.bars.iter().map(|b| (b.name.clone(), Swatch::Bar(b.style))).collect();
    if let Some(o) = &c.overlay {
        items.push((o.name.clone(), Swatch::Overlay));
    }
    let (mut s, top) = frame(&c.title, &c.y_label, &c.x_label, &items, &ya, &suffix);
    let bottom = top + PLOT_H;
    let band = (W - MR - ML) / n as f64;
    let label_every = n.div_ceil(20).max(1);
    for (i, r) in c.categories.iter().enumerate() {
        let cx = ML + band * (i as f64 + 0.5);
        if i % label_every == 0 {
            let _ = write!(
                s,
                "<text class=\"tk\" x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{r}</text>",
                bottom + 16.0
            );
        }
        if c.stacked {
            let w = band * 0.6;
            let mut acc = 0.0;
            for b in &c.bars {
                let Some(v) = vals(b, i).filter(|v| *v > 0.0) else { continue };
                let y1 = y_px((acc + v) / div, &ya, top);
                let y0 = y_px(acc / div, &ya, top);
                acc += v;
                let _ = write!(s, "<rect x=\"{:.1}\" y=\"{y1:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} · round {r}: {}</title></rect>", cx - w / 2.0, (y0 - y1).max(0.0), color(b.style), esc(&b.name), esc(&fmt_value(v)));
            }
        } else {
            let k = c.bars.len().max(1) as f64;
            let w = band * 0.8 / k;
            for (j, b) in c.bars.iter().enumerate() {
                let Some(v) = vals(b, i) else { continue };
                let x = cx - band * 0.4 + w * j as f64;
                let y1 = y_px(v.max(0.0) / div, &ya, top);
                let _ = write!(s, "<rect x=\"{x:.1}\" y=\"{y1:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} · round {r}: {}</title></rect>", (w - 1.0).max(0.5), (bottom - y1).max(0.0), color(b.style), esc(&b.name), esc(&fmt_value(v)));
            }
        }
    }
    if let Some(o) = &c.overlay {
        let p: Vec<(f64, f64, f64)> = (0..n)
            .filter_map(|i| vals(o, i).map(|v| (ML + band * (i as f64 + 0.5), y_px(v / div, &ya, top), v)))
            .collect();
        if p.len() > 1 {
            let coords: Vec<String> = p.iter().map(|(x, y, _)| format!("{x:.1},{y:.1}")).collect();
            let _ = write!(
                s,
                "<polyline fill=\"none\" stroke=\"#333\" stroke-width=\"1.5\" points=\"{}\"/>",
                coords.join(" ")
            );
        }
        for (x, y, v) in &p {
            let _ = write!(
                s,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"#333\"><title>{}: {}</title></circle>",
                esc(&o.name),
                esc(&fmt_value(*v))
            );
        }
    }
    s.push_str("</svg>");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axes() {
        let a = axis(0.0, 7.3, 5);
        assert_eq!(a.ticks, vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(a.decimals, 0);
        let a = axis(0.51, 0.63, 5);
        assert_eq!(a.decimals, 3);
        assert!(a.lo <= 0.51 && a.hi >= 0.63);
        let a = axis(5.0, 5.0, 5);
        assert!(a.lo < 5.0 && a.hi > 5.0);
        let a = axis(0.0, 1.0, 4);
        assert_eq!(a.ticks, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(a.decimals, 2);
    }

    #[test]
    fn integer_ticks() {
        assert_eq!(int_ticks(1.0, 3.0), vec![1.0, 2.0, 3.0]);
        assert_eq!(int_ticks(4.0, 4.0), vec![4.0]);
        assert_eq!(int_ticks(0.0, 100.0).len(), 11);
    }

    #[test]
    fn empty_charts_are_none() {
        let c = LineChart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            unit: Unit::Plain,
            lines: vec![Line {
                name: "a".into(),
                style: 0,
                points: vec![Point { x: 1.0, y: f64::NAN, tip: String::new(), hollow: false }],
            }],
        };
        assert!(line_chart(&c).is_none());
        let b = BarChart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            unit: Unit::Bytes,
            categories: vec![1],
            bars: vec![Bars { name: "a".into(), style: 0, values: vec![None] }],
            stacked: false,
            overlay: None,
        };
        assert!(bar_chart(&b, num).is_none());
    }

    #[test]
    fn escapes_names() {
        let c = LineChart {
            title: "<t>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            unit: Unit::Plain,
            lines: vec![Line {
                name: "<b>".into(),
                style: 0,
                points: vec![Point { x: 1.0, y: 2.0, tip: "<i>".into(), hollow: true }],
            }],
        };
        let s = line_chart(&c).unwrap();
        assert!(!s.contains("<b>") && !s.contains("<i>") && !s.contains("<t>"));
        assert!(s.contains("&lt;b&gt;"));
    }
}
