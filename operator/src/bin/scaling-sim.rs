//! `scaling-sim`: runs flashsale's scaling loop and a stock HPA over a traffic
//! curve and reports the capacity each leaves short, with a CSV timeline and an
//! SVG plot. See docs/scaling.md.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use clap::Parser;
use operator::scaling::simulation::{
    SimConfig, SimReport, TrafficCurve, flash_sale_profile, simulate, timeline_csv,
};
use plotters::prelude::*;

#[derive(Parser, Debug)]
#[command(
    about = "Simulate flashsale's gateway autoscaling against a stock HPA on a traffic curve"
)]
struct Args {
    /// Traffic curve CSV (`t_seconds,connections,requests_per_second`); the built-in flash-sale profile if absent.
    #[arg(long)]
    curve: Option<PathBuf>,
    /// Seconds to simulate (default: the built-in profile's 3300, or the curve's last point).
    #[arg(long)]
    duration: Option<u32>,
    /// Sale start, seconds from the beginning of the curve.
    #[arg(long, default_value_t = 600)]
    start: u32,
    /// Sale end, seconds from the beginning of the curve.
    #[arg(long, default_value_t = 2400)]
    end: u32,
    #[arg(long, default_value_t = 300)]
    warmup: u32,
    #[arg(long, default_value_t = 2)]
    min: i32,
    #[arg(long, default_value_t = 50)]
    max: i32,
    #[arg(long, default_value_t = 10)]
    at_start: i32,
    #[arg(long, default_value_t = 20_000.0)]
    target_connections: f64,
    #[arg(long, default_value_t = 15_000.0)]
    target_rps: f64,
    /// Seconds from a pod's request to its readiness.
    #[arg(long, default_value_t = 10)]
    readiness_delay: u32,
    /// flashsale's loop period in seconds.
    #[arg(long, default_value_t = 2)]
    flashsale_period: u32,
    /// The stock HPA's sync period in seconds.
    #[arg(long, default_value_t = 15)]
    hpa_period: u32,
    /// Write the per-second timeline here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the plot here (SVG).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print the figures as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut config = SimConfig {
        duration_seconds: args
            .duration
            .unwrap_or(SimConfig::default().duration_seconds),
        start_seconds: args.start,
        end_seconds: args.end,
        warmup_seconds: args.warmup,
        min_replicas: args.min,
        max_replicas: args.max,
        at_start: args.at_start,
        target_connections_per_pod: args.target_connections,
        target_requests_per_second_per_pod: args.target_rps,
        readiness_delay_seconds: args.readiness_delay,
        flashsale_period_seconds: args.flashsale_period,
        hpa_period_seconds: args.hpa_period,
        ..SimConfig::default()
    };
    if config.end_seconds < config.start_seconds
        || config.min_replicas < 0
        || config.max_replicas < config.min_replicas
    {
        return Err(anyhow!("need start <= end and 0 <= min <= max"));
    }
    if !(config.target_connections_per_pod > 0.0 && config.target_requests_per_second_per_pod > 0.0)
    {
        return Err(anyhow!("targets must be positive"));
    }
    let (curve, source) = match &args.curve {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let curve = TrafficCurve::parse_csv(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            if args.duration.is_none() {
                // The curve's length bounds the run; MAX_CURVE_SECONDS keeps this in range.
                config.duration_seconds = curve.end_seconds().ceil() as u32;
            }
            (curve, path.display().to_string())
        }
        None => (
            flash_sale_profile(&config),
            "built-in flash-sale profile".to_string(),
        ),
    };
    let report = simulate(&curve, &config);

    if let Some(path) = &args.csv {
        std::fs::write(path, timeline_csv(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        plot(&report, path).with_context(|| format!("plotting {}", path.display()))?;
    }
    if args.json {
        let json = serde_json::json!({ "curve": source, "report": report });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_table(&report, &source);
    }
    Ok(())
}

fn print_table(report: &SimReport, source: &str) {
    let c = &report.config;
    println!(
        "{source}: {} s, start {} s, end {} s, warmup {} s, min {}, max {}, atStart {}, \
         targets {} connections/pod and {} requests/s/pod, pods ready {} s after request",
        c.duration_seconds,
        c.start_seconds,
        c.end_seconds,
        c.warmup_seconds,
        c.min_replicas,
        c.max_replicas,
        c.at_start,
        c.target_connections_per_pod,
        c.target_requests_per_second_per_pod,
        c.readiness_delay_seconds
    );
    let (f, h) = (&report.flashsale, &report.stock_hpa);
    let flashsale = format!("flashsale ({} s, schedule)", c.flashsale_period_seconds);
    let hpa = format!("stock HPA ({} s)", c.hpa_period_seconds);
    println!("{:<34}{:>26}{:>26}", "", flashsale, hpa);
    let row = |name: &str, a: String, b: String| println!("{name:<34}{a:>26}{b:>26}");
    row(
        "shortfall (connection-seconds)",
        format!("{:.0}", f.shortfall_connection_seconds),
        format!("{:.0}", h.shortfall_connection_seconds),
    );
    row(
        "shortfall at the start second",
        format!("{:.0}", f.shortfall_at_start),
        format!("{:.0}", h.shortfall_at_start),
    );
    row(
        "seconds with a shortfall",
        f.seconds_short.to_string(),
        h.seconds_short.to_string(),
    );
    row(
        "ready pods at the start second",
        f.ready_at_start.to_string(),
        h.ready_at_start.to_string(),
    );
    row(
        "peak replicas",
        f.peak_replicas.to_string(),
        h.peak_replicas.to_string(),
    );
    row(
        "pod-seconds",
        format!("{:.0}", f.pod_seconds),
        format!("{:.0}", h.pod_seconds),
    );
}

/// A step series keeping only the points where the value changes.
fn steps(points: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut last: Option<(f64, f64)> = None;
    for (x, y) in points {
        match last {
            Some((_, ly)) if ly == y => {}
            Some((_, ly)) => {
                out.push((x, ly));
                out.push((x, y));
            }
            None => out.push((x, y)),
        }
        last = Some((x, y));
    }
    if let (Some(end), Some(tail)) = (last, out.last())
        && *tail != end
    {
        out.push(end);
    }
    out
}

const FLASHSALE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const HPA: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const LOAD: RGBColor = RGBColor(0x55, 0x55, 0x55);

fn plot(report: &SimReport, path: &Path) -> Result<()> {
    let c = &report.config;
    let start = f64::from(c.start_seconds);
    let root = SVGBackend::new(path, (1000, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(430);

    // Upper: the minutes around the start, load against the capacity each run had ready.
    let (from, to) = (-60.0, 300.0);
    let window: Vec<_> = report
        .timeline
        .iter()
        .filter(|s| (from..=to).contains(&(f64::from(s.t_seconds) - start)))
        .collect();
    let top = window
        .iter()
        .map(|s| {
            s.connections
                .max(s.flashsale.capacity)
                .max(s.stock_hpa.capacity)
        })
        .fold(0.0, f64::max)
        / 1000.0
        * 1.45;
    let mut chart = ChartBuilder::on(&upper)
        .caption(
            "Connections around the sale's start: load vs ready capacity",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(from..to, 0.0..top.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("seconds from startTime")
        .y_desc("thousand connections")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let rel = |s: &&operator::scaling::simulation::Sample| f64::from(s.t_seconds) - start;
    chart
        .draw_series(
            AreaSeries::new(
                window.iter().map(|s| (rel(s), s.connections / 1000.0)),
                0.0,
                LOAD.mix(0.15),
            )
            .border_style(LOAD.stroke_width(2)),
        )?
        .label("load (connections)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], LOAD.stroke_width(2)));
    for (name, color, capacity, short) in [
        (
            "flashsale",
            FLASHSALE,
            window
                .iter()
                .map(|s| (rel(s), s.flashsale.capacity / 1000.0))
                .collect::<Vec<_>>(),
            report.flashsale.shortfall_connection_seconds,
        ),
        (
            "stock HPA",
            HPA,
            window
                .iter()
                .map(|s| (rel(s), s.stock_hpa.capacity / 1000.0))
                .collect::<Vec<_>>(),
            report.stock_hpa.shortfall_connection_seconds,
        ),
    ] {
        chart
            .draw_series(LineSeries::new(
                steps(capacity.into_iter()),
                color.stroke_width(3),
            ))?
            .label(format!(
                "{name} capacity — shortfall {:.2} M connection-s",
                short / 1e6
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 15))
        .draw()?;

    // Lower: replicas requested over the whole run.
    let minutes = |t: u32| (f64::from(t) - start) / 60.0;
    let (x0, x1) = (minutes(0), minutes(c.duration_seconds));
    let peak = f64::from(
        report
            .flashsale
            .peak_replicas
            .max(report.stock_hpa.peak_replicas),
    );
    let mut chart = ChartBuilder::on(&lower)
        .caption("Replicas requested over the whole run", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0.0..(peak * 1.15).max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("minutes from startTime")
        .y_desc("replicas")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let marks = [
        (
            minutes(c.start_seconds.saturating_sub(c.warmup_seconds)),
            "warmup",
        ),
        (0.0, "start"),
        (minutes(c.end_seconds), "end"),
    ];
    for (x, label) in marks {
        chart.draw_series(LineSeries::new(
            vec![(x, 0.0), (x, peak * 1.15)],
            BLACK.mix(0.35),
        ))?;
        chart.draw_series(std::iter::once(Text::new(
            label,
            (x, peak * 1.1),
            ("sans-serif", 14),
        )))?;
    }
    for (name, color, series) in [
        (
            "flashsale (2 s loop, atStart floor)",
            FLASHSALE,
            report
                .timeline
                .iter()
                .map(|s| (minutes(s.t_seconds), f64::from(s.flashsale.replicas)))
                .collect::<Vec<_>>(),
        ),
        (
            "stock HPA (15 s sync)",
            HPA,
            report
                .timeline
                .iter()
                .map(|s| (minutes(s.t_seconds), f64::from(s.stock_hpa.replicas)))
                .collect::<Vec<_>>(),
        ),
    ] {
        chart
            .draw_series(LineSeries::new(
                steps(series.into_iter()),
                color.stroke_width(3),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    // In the gap between the floor and the scaled-down HPA, where no line or mark runs.
    let (legend_x, legend_y) = chart.backend_coord(&(14.5, 8.6));
    let (base_x, base_y) = chart.plotting_area().get_base_pixel();
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::Coordinate(
            legend_x - base_x,
            legend_y - base_y,
        ))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}
