//! Draws a Grafana dashboard's panels as one SVG, each panel from its own
//! queries against Prometheus, laid out on the dashboard's grid: a picture of
//! the data for the docs, not of Grafana's styling.

use std::path::Path;

use anyhow::Context as _;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use super::prometheus::Prometheus;

/// Pixels per grid column (24 across) and per grid row.
const COLUMN: u32 = 60;
const ROW: u32 = 34;
const PALETTE: [RGBColor; 8] = [
    RGBColor(0x73, 0xbf, 0x69),
    RGBColor(0xf2, 0xcc, 0x0c),
    RGBColor(0x56, 0x94, 0xf2),
    RGBColor(0xff, 0x78, 0x0a),
    RGBColor(0xf2, 0x49, 0x5c),
    RGBColor(0xb8, 0x77, 0xd9),
    RGBColor(0x37, 0x87, 0x2d),
    RGBColor(0x8a, 0xb8, 0xff),
];

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// `{{label}}` in a legend format, from the series' labels.
fn legend(format: &str, metric: &Value) -> String {
    let mut out = format.to_string();
    for (k, v) in metric.as_object().into_iter().flatten() {
        out = out.replace(&format!("{{{{{k}}}}}"), v.as_str().unwrap_or_default());
    }
    out
}

fn value(v: &Value) -> Option<f64> {
    v.as_str()?.parse::<f64>().ok().filter(|x| x.is_finite())
}

fn human(v: f64, unit: &str) -> String {
    match unit {
        "s" if v < 1.0 => format!("{:.2} ms", v * 1000.0),
        "s" => format!("{v:.2} s"),
        "ops" | "reqps" => format!("{v:.1}/s"),
        _ if v.fract() == 0.0 => format!("{v:.0}"),
        _ => format!("{v:.2}"),
    }
}

/// Every panel of `board` over the last `seconds`, one point per `step`.
pub async fn draw(
    prometheus: &Prometheus,
    board: &Value,
    substitute: impl Fn(&str) -> String,
    seconds: i64,
    step: u32,
    path: &Path,
) -> anyhow::Result<()> {
    let panels: Vec<&Value> = board["panels"].as_array().into_iter().flatten().collect();
    let bottom = panels
        .iter()
        .map(|p| p["gridPos"]["y"].as_u64().unwrap_or(0) + p["gridPos"]["h"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(1);
    let height = u32::try_from(bottom).unwrap_or(1) * ROW + 40;
    let root = SVGBackend::new(path, (24 * COLUMN, height)).into_drawing_area();
    root.fill(&RGBColor(0xf4, 0xf5, 0xf5))?;
    root.draw(&Text::new(
        board["title"].as_str().unwrap_or_default().to_string(),
        (10, 10),
        ("sans-serif", 20).into_font().color(&BLACK),
    ))?;
    let board_area = root.clone().shrink((0, 40), (24 * COLUMN, height - 40));
    for panel in panels {
        let grid = &panel["gridPos"];
        let at = |k: &str| u32::try_from(grid[k].as_u64().unwrap_or(0)).unwrap_or(0);
        let area = board_area.clone().shrink(
            (at("x") * COLUMN + 3, at("y") * ROW + 3),
            (at("w") * COLUMN - 6, at("h") * ROW - 6),
        );
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        if panel["type"] == "row" {
            area.draw(&Text::new(
                title,
                (4, 6),
                ("sans-serif", 17).into_font().color(&BLACK),
            ))?;
            continue;
        }
        area.fill(&WHITE)?;
        let unit = panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or_default();
        let mut series = Vec::new();
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = substitute(t["expr"].as_str().context("target expr")?);
            let format = t["legendFormat"].as_str().unwrap_or_default();
            let data = prometheus.query_range(&expr, seconds, step).await?;
            for s in data["result"].as_array().into_iter().flatten() {
                let points: Vec<(f64, f64)> = s["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| Some((p[0].as_f64()?, value(&p[1])?)))
                    .collect();
                series.push(Series {
                    name: legend(format, &s["metric"]),
                    points,
                });
            }
        }
        match panel["type"].as_str() {
            Some("stat") => stat(&area, &title, panel, unit, &series)?,
            _ => timeseries(&area, &title, unit, &series, seconds)?,
        }
    }
    root.present()?;
    Ok(())
}

fn stat(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    panel: &Value,
    unit: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    area.draw(&Text::new(
        title.to_string(),
        (8, 6),
        ("sans-serif", 14).into_font().color(&BLACK),
    ))?;
    let last = series
        .iter()
        .find_map(|s| s.points.last().map(|p| (s.name.clone(), p.1)));
    let text = match last {
        None => "no data".to_string(),
        Some((name, _)) if panel["options"]["textMode"] == "name" => name,
        Some((_, v)) => {
            let mapped = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
                [format!("{v:.0}")]["text"]
                .as_str()
                .map(String::from);
            mapped.unwrap_or_else(|| human(v, unit))
        }
    };
    area.draw(&Text::new(
        text,
        (12, 40),
        ("sans-serif", 34).into_font().color(&PALETTE[0].mix(1.0)),
    ))?;
    Ok(())
}

fn timeseries(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    unit: &str,
    series: &[Series],
    seconds: i64,
) -> anyhow::Result<()> {
    let end = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(f64::MIN, f64::max);
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    // seconds → f64 is exact for any window a test runs.
    let span = seconds as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 14))
        .margin(6)
        .x_label_area_size(18)
        .y_label_area_size(52)
        .build_cartesian_2d(-span..0.0, 0.0..top)?;
    chart
        .configure_mesh()
        .x_labels(5)
        .y_labels(4)
        .x_label_formatter(&|v| format!("{v:.0}s"))
        .y_label_formatter(&|v| human(*v, unit))
        .label_style(("sans-serif", 10))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    if series.is_empty() {
        chart.draw_series(std::iter::once(Text::new(
            "no data",
            (-span / 2.0, top / 2.0),
            ("sans-serif", 13),
        )))?;
    }
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|(t, v)| (t - end, *v)),
                color.stroke_width(2),
            ))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.2))
            .label_font(("sans-serif", 10))
            .draw()?;
    }
    Ok(())
}
