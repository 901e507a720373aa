//! Traffic-curve simulation behind `scaling-sim`: flashsale's loop (every 2 s,
//! schedule-aware) and a stock HPA (every 15 s, no schedule) scale the same
//! gateway on the same curve, and the capacity each leaves short is integrated.
//!
//! Model, kept deliberately simple and deterministic:
//! - one step per second; load is spread evenly over ready pods, and every ready
//!   pod reports its share at that second (no report lag, for both runs);
//! - a requested pod becomes ready `readiness_delay_s` after the request; removals
//!   take not-ready pods first, then the newest (as a ReplicaSet does);
//! - capacity = ready pods × `targetConnectionsPerPod`; the shortfall is the
//!   left Riemann sum of max(0, connections − capacity) over 1 s steps.

use std::fmt::Write as _;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use super::behavior::ScalingBehavior;
use super::decision::{
    GatewayObservation, GatewayScaling, LoadReport, PodReadiness, decide_gateway,
};
use super::history::ScalingState;
use super::prescale::SaleWindow;

/// Load at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPoint {
    pub t_seconds: f64,
    pub connections: f64,
    pub requests_per_second: f64,
}

/// Load over time, interpolated linearly between points and held flat beyond them.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficCurve {
    points: Vec<TrafficPoint>,
}

/// Why a traffic curve was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CurveError {
    #[error("the curve has no points")]
    Empty,
    #[error("line {line}: expected `t_seconds,connections,requests_per_second`, got {text:?}")]
    Malformed { line: usize, text: String },
    #[error(
        "line {line}: values must be finite, non-negative and t_seconds at most {MAX_CURVE_SECONDS}"
    )]
    OutOfRange { line: usize },
    #[error("line {line}: t_seconds must increase")]
    NotIncreasing { line: usize },
}

/// Longest curve accepted (one week), which keeps every timestamp representable.
pub const MAX_CURVE_SECONDS: f64 = 604_800.0;

impl TrafficCurve {
    /// A curve from points with strictly increasing, non-negative times.
    pub fn new(points: Vec<TrafficPoint>) -> Result<Self, CurveError> {
        if points.is_empty() {
            return Err(CurveError::Empty);
        }
        for (i, p) in points.iter().enumerate() {
            let values = [p.t_seconds, p.connections, p.requests_per_second];
            if values.iter().any(|v| !v.is_finite() || *v < 0.0) || p.t_seconds > MAX_CURVE_SECONDS
            {
                return Err(CurveError::OutOfRange { line: i + 1 });
            }
            if i > 0 && p.t_seconds <= points[i - 1].t_seconds {
                return Err(CurveError::NotIncreasing { line: i + 1 });
            }
        }
        Ok(TrafficCurve { points })
    }

    /// Parses `t_seconds,connections,requests_per_second` lines; a header line,
    /// blank lines and `#` comments are skipped. Line numbers in errors are the file's.
    pub fn parse_csv(text: &str) -> Result<Self, CurveError> {
        let mut points = Vec::new();
        let mut lines = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with("t_seconds") {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let parsed: Option<Vec<f64>> = match fields.as_slice() {
                [t, c, r] => [t, c, r].iter().map(|f| f.parse::<f64>().ok()).collect(),
                _ => None,
            };
            let Some([t, c, r]) = parsed.as_deref().and_then(|v| <[f64; 3]>::try_from(v).ok())
            else {
                return Err(CurveError::Malformed {
                    line: index + 1,
                    text: line.to_string(),
                });
            };
            points.push(TrafficPoint {
                t_seconds: t,
                connections: c,
                requests_per_second: r,
            });
            lines.push(index + 1);
        }
        // Report problems against file lines, not point indices.
        TrafficCurve::new(points).map_err(|err| match err {
            CurveError::OutOfRange { line } => CurveError::OutOfRange {
                line: lines[line - 1],
            },
            CurveError::NotIncreasing { line } => CurveError::NotIncreasing {
                line: lines[line - 1],
            },
            other => other,
        })
    }

    /// Load at `t` seconds.
    pub fn at(&self, t: f64) -> (f64, f64) {
        let after = self.points.partition_point(|p| p.t_seconds <= t);
        let point = |p: &TrafficPoint| (p.connections, p.requests_per_second);
        match (
            after.checked_sub(1).map(|i| &self.points[i]),
            self.points.get(after),
        ) {
            (Some(a), Some(b)) => {
                let f = (t - a.t_seconds) / (b.t_seconds - a.t_seconds);
                (
                    a.connections + f * (b.connections - a.connections),
                    a.requests_per_second + f * (b.requests_per_second - a.requests_per_second),
                )
            }
            (Some(a), None) => point(a),
            (None, Some(b)) => point(b),
            (None, None) => (0.0, 0.0),
        }
    }

    /// Time of the last point.
    pub fn end_seconds(&self) -> f64 {
        self.points.last().map_or(0.0, |p| p.t_seconds)
    }

    pub fn points(&self) -> &[TrafficPoint] {
        &self.points
    }
}

/// Settings of a simulation run; `Default` is the built-in flash sale.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimConfig {
    pub duration_seconds: u32,
    pub start_seconds: u32,
    pub end_seconds: u32,
    pub warmup_seconds: u32,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub at_start: i32,
    pub target_connections_per_pod: f64,
    pub target_requests_per_second_per_pod: f64,
    pub readiness_delay_seconds: u32,
    pub flashsale_period_seconds: u32,
    pub hpa_period_seconds: u32,
    #[serde(skip)]
    pub behavior: ScalingBehavior,
}

impl Default for SimConfig {
    /// The example sale: quiet for 10 minutes, a 30-minute sale, 15 minutes after it.
    fn default() -> Self {
        SimConfig {
            duration_seconds: 3300,
            start_seconds: 600,
            end_seconds: 2400,
            warmup_seconds: 300,
            min_replicas: 2,
            max_replicas: 50,
            at_start: 10,
            target_connections_per_pod: 20_000.0,
            target_requests_per_second_per_pod: 15_000.0,
            readiness_delay_seconds: 10,
            flashsale_period_seconds: 2,
            hpa_period_seconds: 15,
            behavior: ScalingBehavior::default(),
        }
    }
}

/// The built-in flash-sale curve for `config`'s start and end: a quiet crowd
/// gathering (4 000 → 20 000 connections), a wall of 180 000 connections and
/// 129 000 requests/s at the start second, a peak of 260 000 connections 20 s
/// later, then decay (τ = 240 s for connections, 20 s for the button-press burst),
/// and the crowd leaving after the end.
pub fn flash_sale_profile(config: &SimConfig) -> TrafficCurve {
    let start = f64::from(config.start_seconds);
    let end = f64::from(config.end_seconds.max(config.start_seconds));
    let connections = |t: f64| -> f64 {
        if t < start {
            4_000.0 + 16_000.0 * t / start.max(1.0)
        } else if t < start + 20.0 {
            180_000.0 + 80_000.0 * (t - start) / 20.0
        } else if t < end {
            15_000.0 + 245_000.0 * (-(t - start - 20.0) / 240.0).exp()
        } else {
            let at_end = 15_000.0 + 245_000.0 * (-(end - start - 20.0) / 240.0).exp();
            2_000.0 + (at_end - 2_000.0) * (-(t - end) / 60.0).exp()
        }
    };
    let requests = |t: f64, c: f64| -> f64 {
        let burst = if t >= start {
            120_000.0 * (-(t - start) / 20.0).exp()
        } else {
            0.0
        };
        burst + 0.05 * c
    };
    let points = (0..=config.duration_seconds)
        .map(|s| {
            let t = f64::from(s);
            let c = connections(t);
            TrafficPoint {
                t_seconds: t,
                connections: c,
                requests_per_second: requests(t, c),
            }
        })
        .collect();
    TrafficCurve { points }
}

/// One second of one run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSample {
    /// Replicas requested (the scale subresource's `spec.replicas`).
    pub replicas: i32,
    pub ready: i32,
    pub capacity: f64,
    pub shortfall: f64,
}

/// One second of the simulation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    pub t_seconds: u32,
    pub connections: f64,
    pub requests_per_second: f64,
    pub flashsale: RunSample,
    pub stock_hpa: RunSample,
}

/// Figures of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// ∫ max(0, connections − capacity) dt, in connection-seconds.
    pub shortfall_connection_seconds: f64,
    /// max(0, connections − capacity) at the sale's start second.
    pub shortfall_at_start: f64,
    /// Seconds with any shortfall.
    pub seconds_short: u32,
    pub ready_at_start: i32,
    pub peak_replicas: i32,
    /// Σ requested replicas × 1 s: what the run costs.
    pub pod_seconds: f64,
}

/// Timeline and figures of both runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimReport {
    pub config: SimConfig,
    pub flashsale: RunSummary,
    pub stock_hpa: RunSummary,
    #[serde(skip)]
    pub timeline: Vec<Sample>,
}

/// A simulated Deployment: pods with the second they become ready.
struct Fleet {
    prefix: &'static str,
    ready_at: Vec<(u64, u32)>,
    next_id: u64,
}

impl Fleet {
    fn new(prefix: &'static str, replicas: i32) -> Self {
        let mut fleet = Fleet {
            prefix,
            ready_at: Vec::new(),
            next_id: 0,
        };
        fleet.scale_to(replicas, 0, 0);
        fleet
    }

    fn replicas(&self) -> i32 {
        i32::try_from(self.ready_at.len()).unwrap_or(i32::MAX)
    }

    fn ready(&self, t: u32) -> i32 {
        let n = self.ready_at.iter().filter(|(_, at)| *at <= t).count();
        i32::try_from(n).unwrap_or(i32::MAX)
    }

    fn scale_to(&mut self, replicas: i32, t: u32, delay: u32) {
        let target = usize::try_from(replicas.max(0)).unwrap_or(0);
        while self.ready_at.len() < target {
            self.ready_at.push((self.next_id, t.saturating_add(delay)));
            self.next_id += 1;
        }
        if self.ready_at.len() > target {
            // Not-ready pods first, then the newest.
            self.ready_at
                .sort_by_key(|&(id, at)| (at <= t, std::cmp::Reverse(id)));
            self.ready_at.drain(..self.ready_at.len() - target);
        }
    }

    fn observe(
        &self,
        t: u32,
        connections: f64,
        rps: f64,
        now: Timestamp,
    ) -> (Vec<PodReadiness>, Vec<LoadReport>) {
        let ready = self.ready(t).max(1);
        let pods: Vec<PodReadiness> = self
            .ready_at
            .iter()
            .map(|&(id, at)| PodReadiness {
                name: format!("{}-{id}", self.prefix),
                ready: at <= t,
            })
            .collect();
        let reports = pods
            .iter()
            .filter(|p| p.ready)
            .map(|p| LoadReport {
                pod: p.name.clone(),
                connections: connections / f64::from(ready),
                requests_per_second: rps / f64::from(ready),
                reported_at: now,
            })
            .collect();
        (pods, reports)
    }
}

/// One autoscaler under simulation.
struct Run {
    settings: GatewayScaling,
    period: u32,
    fleet: Fleet,
    state: ScalingState,
    summary: RunSummary,
}

impl Run {
    fn step(&mut self, t: u32, connections: f64, rps: f64, config: &SimConfig) -> RunSample {
        let now = instant(t);
        if self.period > 0 && t.is_multiple_of(self.period) {
            let (pods, reports) = self.fleet.observe(t, connections, rps, now);
            let observed = GatewayObservation {
                current_replicas: self.fleet.replicas(),
                pods: &pods,
                reports: &reports,
            };
            let decision = decide_gateway(&self.settings, &observed, &self.state, now);
            self.fleet
                .scale_to(decision.desired_replicas, t, config.readiness_delay_seconds);
            self.state = decision.state;
        }
        let ready = self.fleet.ready(t);
        let capacity = f64::from(ready) * config.target_connections_per_pod;
        let shortfall = (connections - capacity).max(0.0);
        let replicas = self.fleet.replicas();
        let s = &mut self.summary;
        s.shortfall_connection_seconds += shortfall;
        s.seconds_short += u32::from(shortfall > 0.0);
        s.peak_replicas = s.peak_replicas.max(replicas);
        s.pod_seconds += f64::from(replicas);
        if t == config.start_seconds {
            s.shortfall_at_start = shortfall;
            s.ready_at_start = ready;
        }
        RunSample {
            replicas,
            ready,
            capacity,
            shortfall,
        }
    }
}

fn instant(t: u32) -> Timestamp {
    Timestamp::UNIX_EPOCH + SignedDuration::from_secs(i64::from(t))
}

/// Runs flashsale's loop and the stock HPA over `curve` for `config.duration_seconds`.
pub fn simulate(curve: &TrafficCurve, config: &SimConfig) -> SimReport {
    let reactive = GatewayScaling {
        behavior: config.behavior.clone(),
        ..GatewayScaling::new(
            config.min_replicas,
            config.max_replicas,
            config.target_connections_per_pod,
            config.target_requests_per_second_per_pod,
        )
    };
    let sale = SaleWindow {
        start: instant(config.start_seconds),
        end: instant(config.end_seconds),
        warmup: SignedDuration::from_secs(i64::from(config.warmup_seconds)),
    };
    let new_run = |settings: GatewayScaling, period, prefix| Run {
        settings,
        period,
        fleet: Fleet::new(prefix, config.min_replicas),
        state: ScalingState::default(),
        summary: RunSummary::default(),
    };
    let mut flashsale = new_run(
        GatewayScaling {
            at_start: Some(config.at_start),
            sale: Some(sale),
            ..reactive.clone()
        },
        config.flashsale_period_seconds,
        "flashsale",
    );
    let mut stock_hpa = new_run(reactive, config.hpa_period_seconds, "hpa");
    let timeline = (0..=config.duration_seconds)
        .map(|t| {
            let (connections, rps) = curve.at(f64::from(t));
            Sample {
                t_seconds: t,
                connections,
                requests_per_second: rps,
                flashsale: flashsale.step(t, connections, rps, config),
                stock_hpa: stock_hpa.step(t, connections, rps, config),
            }
        })
        .collect();
    SimReport {
        config: config.clone(),
        flashsale: flashsale.summary,
        stock_hpa: stock_hpa.summary,
        timeline,
    }
}

/// The timeline as CSV, one row per second.
pub fn timeline_csv(report: &SimReport) -> String {
    let mut out = String::from(
        "t_seconds,connections,requests_per_second,\
         flashsale_replicas,flashsale_ready,flashsale_capacity,flashsale_shortfall,\
         hpa_replicas,hpa_ready,hpa_capacity,hpa_shortfall\n",
    );
    for s in &report.timeline {
        let (f, h) = (&s.flashsale, &s.stock_hpa);
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "{},{:.0},{:.0},{},{},{:.0},{:.0},{},{},{:.0},{:.0}",
            s.t_seconds,
            s.connections,
            s.requests_per_second,
            f.replicas,
            f.ready,
            f.capacity,
            f.shortfall,
            h.replicas,
            h.ready,
            h.capacity,
            h.shortfall
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // The promise of docs/scaling.md, checked on the deterministic built-in profile.
    #[test]
    fn built_in_profile_flashsale_beats_the_stock_hpa() {
        let config = SimConfig::default();
        let report = simulate(&flash_sale_profile(&config), &config);
        let (fs, hpa) = (&report.flashsale, &report.stock_hpa);
        assert_eq!(
            fs.shortfall_at_start, 0.0,
            "flashsale is short at the start second: {fs:?}"
        );
        assert_eq!(fs.ready_at_start, config.at_start);
        assert!(hpa.shortfall_at_start > 0.0, "{hpa:?}");
        assert!(
            fs.shortfall_connection_seconds < hpa.shortfall_connection_seconds,
            "flashsale {fs:?} vs stock HPA {hpa:?}"
        );
        // Both return to min after the sale: the floor lifts at the end.
        let last = report
            .timeline
            .last()
            .map(|s| (s.flashsale.replicas, s.stock_hpa.replicas));
        assert_eq!(last, Some((config.min_replicas, config.min_replicas)));
    }

    #[test]
    fn floor_starts_at_warmup_and_lifts_at_end() {
        let config = SimConfig::default();
        let report = simulate(&flash_sale_profile(&config), &config);
        let at = |t: u32| report.timeline[t as usize].flashsale;
        let prescale = config.start_seconds - config.warmup_seconds;
        assert_eq!(at(prescale - 1).replicas, config.min_replicas);
        assert_eq!(at(prescale).replicas, config.at_start);
        assert_eq!(
            at(prescale + config.readiness_delay_seconds).ready,
            config.at_start
        );
        assert_eq!(at(config.end_seconds - 1).replicas, config.at_start);
        assert_eq!(at(config.end_seconds).replicas, config.min_replicas);
    }

    #[test]
    fn csv_curves_interpolate_and_reject_bad_lines() {
        let curve = TrafficCurve::parse_csv(
            "t_seconds,connections,requests_per_second\n0,0,0\n# wall\n10,1000,50\n",
        )
        .expect("valid curve");
        assert_eq!(curve.at(5.0), (500.0, 25.0));
        assert_eq!(curve.at(60.0), (1000.0, 50.0));
        assert_eq!(curve.end_seconds(), 10.0);
        assert_eq!(
            TrafficCurve::parse_csv("0,1\n"),
            Err(CurveError::Malformed {
                line: 1,
                text: "0,1".to_string()
            })
        );
        assert_eq!(
            TrafficCurve::parse_csv("0,1,1\n\n0,2,2\n"),
            Err(CurveError::NotIncreasing { line: 3 })
        );
        assert_eq!(
            TrafficCurve::parse_csv("0,-1,1\n"),
            Err(CurveError::OutOfRange { line: 1 })
        );
        assert_eq!(
            TrafficCurve::parse_csv("t_seconds,connections,requests_per_second\n"),
            Err(CurveError::Empty)
        );
    }

    #[test]
    fn timeline_csv_has_a_row_per_second() {
        let config = SimConfig {
            duration_seconds: 30,
            ..SimConfig::default()
        };
        let report = simulate(&flash_sale_profile(&config), &config);
        let csv = timeline_csv(&report);
        assert_eq!(csv.lines().count(), 32);
        assert!(
            csv.lines()
                .nth(1)
                .is_some_and(|row| row.starts_with("0,4000,200,2,2,40000,0,2,2,40000,0")),
            "{csv}"
        );
    }
}
