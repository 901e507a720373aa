//! The real `flashsale-operator` binary against a real control plane
//! (kube-apiserver and kube-controller-manager v1.20.2 with etcd, built by
//! `scripts/build-kube-v1.20.sh`), under the chart's own RBAC, with real Redis,
//! PostgreSQL and data plane processes. Each test has its own control plane.
//!
//! v1.20 checks server-side apply, the status and scale subresources, owner
//! references and garbage collection, RBAC, Leases and Events; it cannot check
//! CEL rules (stripped from the CRD here), `policy/v1` or `autoscaling/v2`.

mod support;

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ResourceQuota, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use operator::resource::{FlashSale, SalePhase};
use serde_json::json;
use support::rig::{self, OPERATOR_NS, Rig, SHOP};

fn phase(s: &FlashSale) -> Option<SalePhase> {
    s.status.as_ref().and_then(|s| s.phase)
}

fn condition<'a>(
    s: &'a FlashSale,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.type_ == type_))
}

async fn get_sale(rig: &Rig, name: &str) -> Option<FlashSale> {
    rig.sales().get_opt(name).await.ok().flatten()
}

/// Waits until the sale reaches `want`; returns it and when it was seen.
async fn reach(rig: &Rig, name: &str, want: SalePhase, secs: u64) -> (FlashSale, Timestamp) {
    rig.eventually(&format!("phase {want}"), secs, || async {
        let s = get_sale(rig, name).await?;
        (phase(&s) == Some(want)).then(|| (s, Timestamp::now()))
    })
    .await
}

/// The Lease's holder, when someone holds it.
async fn lease_holder(rig: &Rig) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(rig.admin.clone(), OPERATOR_NS);
    let lease = leases.get_opt("flashsale-operator").await.ok()??;
    lease.spec?.holder_identity
}

async fn replicas(rig: &Rig, name: &str) -> Option<i32> {
    let d = rig.api::<Deployment>().get_opt(name).await.ok()??;
    d.spec?.replicas
}

/// A purchase through a gateway process, as a buyer would send it: (HTTP status, body).
async fn purchase(port: u16, sale: &str, user: &str, sku: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let token = dataplane::token::issue(b"e2e-secret", user, 600)?;
    let body = json!({"sku": sku, "quantity": 1}).to_string();
    let request = format!(
        "POST /v1/sales/{sale}/purchase HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Idempotency-Key: {user}-1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// What a rollout would change: both Deployments' pod templates and the ReplicaSets.
struct RolloutState {
    templates: Vec<Option<k8s_openapi::api::core::v1::PodTemplateSpec>>,
    annotations: Vec<Option<std::collections::BTreeMap<String, String>>>,
    replica_sets: Vec<String>,
}

async fn rollout_state(rig: &Rig, sale: &str) -> anyhow::Result<RolloutState> {
    let mut templates = Vec::new();
    for component in ["gateway", "consumer"] {
        let d = rig
            .api::<Deployment>()
            .get(&format!("{sale}-{component}"))
            .await?;
        templates.push(d.spec.map(|s| s.template));
    }
    let annotations = templates
        .iter()
        .map(|t| {
            t.as_ref()
                .and_then(|t| t.metadata.as_ref()?.annotations.clone())
        })
        .collect();
    let mut replica_sets: Vec<String> = rig
        .api::<ReplicaSet>()
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|r| r.name_any())
        .collect();
    replica_sets.sort();
    Ok(RolloutState {
        templates,
        annotations,
        replica_sets,
    })
}

/// A gateway process's HTTP port, once the stand-in kubelet runs one.
async fn gateway_port(rig: &Rig) -> u16 {
    rig.eventually("a running gateway process", 30, || async {
        let kubelet = rig.kubelet.as_ref()?;
        kubelet
            .processes()
            .into_iter()
            .find_map(|(_, component, http, _)| (component == "gateway").then_some(http).flatten())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_runs_on_schedule_under_the_charts_rbac() {
    rig::run(scenario_a_sale_runs_on_schedule_under_the_charts_rbac).await
}

async fn scenario_a_sale_runs_on_schedule_under_the_charts_rbac(
    rig: &mut Rig,
) -> anyhow::Result<()> {
    rig.start_operator("op-a")?;
    rig.start_kubelet()?;
    let rig = &*rig;
    leads(rig, "op-a", 30).await;

    // Warming 30 s from now, Active at 60 s.
    let start = (Timestamp::now() + SignedDuration::from_secs(60)).round(jiff::Unit::Second)?;
    let warm_at = start - SignedDuration::from_secs(30);
    let name = "singles-day";
    let mut sale = rig::sale(name, start, 30, 10);
    sale["spec"]["gateway"]["replicas"] = json!({"min": 2, "max": 4, "atStart": 3});
    rig.apply_sale(&sale).await?;

    // Pending: every child exists, owned by the sale, applied by the operator.
    let (pending, _) = reach(rig, name, SalePhase::Pending, 20).await;
    assert!(
        Timestamp::now() < warm_at,
        "setup took too long to see Pending"
    );
    let configs = rig.api::<ConfigMap>();
    let deployments = rig.api::<Deployment>();
    let services = rig.api::<Service>();
    let children = rig
        .eventually("all children", 20, || async {
            let cm = configs.get_opt(&format!("{name}-dataplane")).await.ok()??;
            let gw = deployments
                .get_opt(&format!("{name}-gateway"))
                .await
                .ok()??;
            let co = deployments
                .get_opt(&format!("{name}-consumer"))
                .await
                .ok()??;
            let svc = services.get_opt(&format!("{name}-gateway")).await.ok()??;
            Some((cm, gw, co, svc))
        })
        .await;
    for meta in [
        &children.0.metadata,
        &children.1.metadata,
        &children.2.metadata,
        &children.3.metadata,
    ] {
        assert!(
            rig::owned_by(meta, &pending),
            "{:?} not owned by the sale",
            meta.name
        );
        let managers = rig::managers(meta);
        assert!(
            managers
                .iter()
                .any(|(m, op, _)| m == "flashsale-operator" && op == "Apply"),
            "{:?}: {managers:?}",
            meta.name
        );
    }
    // Replicas held at min (2; a Deployment without replicas has 1) before
    // warmup, by the autoscaler's write to the scale subresource under its own
    // field manager. v1.20 does not carry a write through the scale
    // subresource into the Deployment's managedFields (later versions do), so
    // the audit log shows the request and its fieldManager.
    let gateway = format!("{name}-gateway");
    rig.eventually("gateway replicas at min", 20, || async {
        (replicas(rig, &gateway).await == Some(2)).then_some(())
    })
    .await;
    let writes = rig::writes_by(
        &rig.plane.audit_log(),
        &rig::operator_user(),
        Timestamp::UNIX_EPOCH,
    )?;
    let scale_writes: Vec<&rig::Write> = writes
        .iter()
        .filter(|w| w.resource == "deployments/scale" && w.name == gateway)
        .collect();
    assert!(
        !scale_writes.is_empty()
            && scale_writes
                .iter()
                .all(|w| w.verb == "patch" && w.uri.contains("fieldManager=flashsale-scaler")),
        "the gateway's scale writes: {scale_writes:?}"
    );

    // The kubelet stand-in runs the gateway and consumer; the sale sees them.
    let available = rig
        .eventually(
            "a gateway and a consumer available in status",
            40,
            || async {
                let s = get_sale(rig, name).await?;
                let st = s.status.as_ref()?;
                let g = st.gateway.as_ref()?.available_replicas?;
                let c = st.consumer.as_ref()?.available_replicas?;
                (g >= 2 && c >= 1).then_some(s)
            },
        )
        .await;
    assert_eq!(phase(&available), Some(SalePhase::Pending));
    let table = rig::table(&rig.admin, name).await?;
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(columns[0], "Name");
    assert_eq!(columns[1..], operator::crd::COLUMNS);
    let cells = &table["rows"][0]["cells"];
    assert_eq!(cells[0], json!(name));
    assert_eq!(cells[1], json!("Pending"));
    assert_eq!(cells[2], json!(400));
    assert_eq!(cells[3], json!(2));
    assert_eq!(cells[4], json!(1));
    // The Ready condition's, read by the server's JSONPath filter.
    assert_eq!(cells[5], json!("True"), "{cells}");
    assert_eq!(cells[6], json!("Reconciled"), "{cells}");

    // Warming at its instant: Redis warmed, gateways raised to atStart (3).
    let (warming, seen) = reach(rig, name, SalePhase::Warming, 45).await;
    assert!(seen >= warm_at, "Warming seen at {seen}, before {warm_at}");
    assert!(
        seen < warm_at + SignedDuration::from_secs(5),
        "Warming seen at {seen}, long after {warm_at}"
    );
    rig.eventually("gateway replicas at atStart", 15, || async {
        (replicas(rig, &gateway).await == Some(3)).then_some(())
    })
    .await;
    let warmed = rig
        .eventually("RedisWarmed", 15, || async {
            let s = get_sale(rig, name).await?;
            (condition(&s, "RedisWarmed")?.status == "True").then_some(s)
        })
        .await;
    let status = warmed.status.clone().unwrap_or_default();
    assert_eq!(status.warmed_generation, warming.metadata.generation);
    assert_eq!(status.remaining, Some(400));
    assert_eq!(status.products.len(), 2);

    // Active at its instant; a buyer's order goes through a gateway process
    // and is persisted by a consumer process; status counts it.
    let (_, seen) = reach(rig, name, SalePhase::Active, 45).await;
    assert!(seen >= start, "Active seen at {seen}, before {start}");
    assert!(
        seen < start + SignedDuration::from_secs(5),
        "Active seen at {seen}"
    );
    let port = gateway_port(rig).await;
    let (code, body) = purchase(port, name, "alice", "phone-17").await?;
    assert_eq!(code, 202, "{body}");
    let sold = rig
        .eventually("the order in status", 40, || async {
            let s = get_sale(rig, name).await?;
            let st = s.status.as_ref()?;
            let phone = st.products.iter().find(|p| p.sku == "phone-17")?;
            (phone.sold == 1 && phone.persisted == 1 && st.remaining == Some(399)).then_some(s)
        })
        .await;
    // The autoscaler read the gateways' load reports.
    let scaled = rig
        .eventually("the autoscaler's status from load reports", 30, || async {
            let s = get_sale(rig, name).await?;
            let g = s.status.as_ref()?.gateway.clone()?;
            (g.replicas == Some(3) && g.requests_per_second.is_some()).then_some(g)
        })
        .await;
    assert!(scaled.connections.is_some(), "{scaled:?}");
    let ready = condition(&sold, "Ready").map(|c| (c.status.clone(), c.reason.clone()));
    assert_eq!(
        ready,
        Some(("True".into(), "Reconciled".into())),
        "{:?}",
        sold.status
    );

    let wanted = [
        "Pending",
        "Warming",
        "Active",
        "RedisWarmed",
        "ScaledGateway",
    ];
    let events = rig
        .events_once(name, 10, |events| {
            wanted
                .iter()
                .all(|want| events.iter().any(|(_, r, _)| r == want))
        })
        .await?;
    let reasons: Vec<&str> = events.iter().map(|(_, r, _)| r.as_str()).collect();
    for want in wanted {
        assert!(reasons.contains(&want), "no {want} Event among {events:?}");
    }
    // Each phase Event names the transition it records.
    let note = |reason: &str| {
        events
            .iter()
            .find(|(_, r, _)| r == reason)
            .map(|(_, _, n)| n.as_str())
    };
    assert_eq!(note("Warming"), Some("Pending → Warming"));
    assert_eq!(note("Active"), Some("Warming → Active"));
    // v1.20 serves no policy/v1: the one Warning says so, and a condition too.
    let warnings: Vec<&(String, String, String)> =
        events.iter().filter(|(t, _, _)| t != "Normal").collect();
    assert!(
        warnings.len() == 1
            && warnings[0].1 == "APIUnavailable"
            && warnings[0].2.contains("policy/v1"),
        "Warnings in a sale that went well: {warnings:?}"
    );
    let pdb =
        condition(&sold, "PodDisruptionBudgets").map(|c| (c.status.clone(), c.reason.clone()));
    assert_eq!(pdb, Some(("False".into(), "APIUnavailable".into())));
    // The chart's RBAC was all the operator needed.
    let log = rig.operators.first().map(|o| o.log()).unwrap_or_default();
    assert!(!log.contains("forbidden"), "a forbidden request:\n{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_live_sale_drains_and_clears_it() {
    rig::run(scenario_deleting_a_live_sale_drains_and_clears_it).await
}

async fn scenario_deleting_a_live_sale_drains_and_clears_it(rig: &mut Rig) -> anyhow::Result<()> {
    rig.start_operator("op-a")?;
    rig.start_kubelet()?;
    let rig = &*rig;
    let start = Timestamp::now() + SignedDuration::from_secs(5);
    let name = "midnight";
    rig.apply_sale(&rig::sale(name, start, 5, 10)).await?;
    reach(rig, name, SalePhase::Active, 40).await;
    let port = gateway_port(rig).await;
    rig.eventually("a purchase accepted", 20, || async {
        let (code, _) = purchase(port, name, "bob", "earbuds-pro").await.ok()?;
        (code == 202).then_some(())
    })
    .await;

    rig.sales().delete(name, &DeleteParams::default()).await?;
    // The finalizer runs: gateways stopped, orders persisted, keys cleared.
    rig.eventually("the sale gone", 60, || async {
        rig.sales()
            .get_opt(name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    // Every gateway process got SIGTERM when its Pod went and exited cleanly.
    let gateway_pod = format!("{name}-gateway-");
    let stopped = rig
        .eventually("the gateway processes to exit", 30, || async {
            let stopped = rig.kubelet.as_ref()?.stopped();
            let gateways: Vec<(String, Option<i32>)> = stopped
                .into_iter()
                .filter(|(pod, _)| pod.starts_with(&gateway_pod))
                .collect();
            (gateways.len() == 2 && gateways.iter().all(|(_, code)| code.is_some()))
                .then_some(gateways)
        })
        .await;
    assert!(
        stopped.iter().all(|(_, code)| *code == Some(0)),
        "gateways: {stopped:?}"
    );
    let client = redis::Client::open(rig.redis.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("fs:{{{SHOP}/{name}*"))
        .query_async(&mut conn)
        .await?;
    assert!(keys.is_empty(), "Redis keys left: {keys:?}");
    let (pg, conn) = tokio_postgres::connect(&rig.postgres.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let persisted: i64 = pg
        .query_one(
            "SELECT count(*) FROM flashsale_orders WHERE sale = $1",
            &[&format!("{SHOP}/{name}")],
        )
        .await?
        .get(0);
    assert_eq!(
        persisted, 1,
        "the accepted order is persisted before the keys go"
    );
    // The controller-manager's garbage collector removes what the sale owned.
    rig.eventually("children garbage-collected", 60, || async {
        let cms = rig
            .api::<ConfigMap>()
            .list(&ListParams::default())
            .await
            .ok()?;
        let svcs = rig
            .api::<Service>()
            .list(&ListParams::default())
            .await
            .ok()?;
        let deps = rig
            .api::<Deployment>()
            .list(&ListParams::default())
            .await
            .ok()?;
        let pods = rig.api::<Pod>().list(&ListParams::default()).await.ok()?;
        let owned = cms
            .items
            .iter()
            .filter(|c| c.name_any().starts_with(name))
            .count()
            + svcs.items.len()
            + deps.items.len()
            + pods.items.len();
        (owned == 0).then_some(())
    })
    .await;
    let cleared =
        |events: &[(String, String, String)]| events.iter().any(|(_, r, _)| r == "RedisCleared");
    let events = rig.events_once(name, 10, cleared).await?;
    assert!(cleared(&events), "{events:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_without_warming_again() {
    rig::run(scenario_a_standby_takes_over_without_warming_again).await
}

async fn scenario_a_standby_takes_over_without_warming_again(rig: &mut Rig) -> anyhow::Result<()> {
    rig.start_operator("op-a")?;
    leads(rig, "op-a", 30).await;
    rig.start_operator("op-b")?;
    let name = "handoff";
    let start = Timestamp::now() + SignedDuration::from_secs(3);
    rig.apply_sale(&rig::sale(name, start, 3, 10)).await?;
    let warmed = {
        let rig = &*rig;
        rig.eventually("RedisWarmed", 40, || async {
            let s = get_sale(rig, name).await?;
            (condition(&s, "RedisWarmed")?.status == "True").then_some(s)
        })
        .await
    };
    let generation = warmed.status.as_ref().and_then(|s| s.warmed_generation);

    // Graceful: SIGTERM releases the Lease.
    let a = rig.operator("op-a")?;
    a.signal(libc::SIGTERM);
    let released = Timestamp::now();
    assert!(
        a.wait_exit(20).await.is_some(),
        "op-a did not exit on SIGTERM"
    );
    leads(rig, "op-b", 20).await;
    let handoff = Timestamp::now().duration_since(released);
    eprintln!("handoff after SIGTERM: {:.1} s", handoff.as_secs_f64());
    // docs/operator.md: the released Lease is taken "at once", not at expiry (15 s).
    assert!(
        handoff < SignedDuration::from_secs(5),
        "a standby took {:.1} s to lead after the leader released the Lease",
        handoff.as_secs_f64()
    );

    // A crash: SIGKILL leaves the Lease to expire (15 s by default).
    rig.start_operator("op-c")?;
    rig.operator("op-b")?.signal(libc::SIGKILL);
    let killed = Timestamp::now();
    leads(rig, "op-c", 25).await;
    let waited = Timestamp::now().duration_since(killed);
    eprintln!("takeover after SIGKILL: {:.1} s", waited.as_secs_f64());
    assert!(
        waited < SignedDuration::from_secs(15 + 5),
        "took {waited:#} after SIGKILL"
    );
    // The new leader reconciles without warming again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = get_sale(rig, name)
        .await
        .ok_or_else(|| anyhow::anyhow!("sale gone"))?;
    assert_eq!(
        after.status.as_ref().and_then(|s| s.warmed_generation),
        generation
    );
    let warms = rig::events(&rig.admin, name)
        .await?
        .into_iter()
        .filter(|(_, r, _)| r == "RedisWarmed")
        .count();
    assert_eq!(warms, 1, "warmed more than once");
    let log = rig.operator("op-c")?.log();
    assert!(log.contains("leading"), "op-c never led:\n{log}");
    assert!(!log.contains("redis warmed"), "op-c warmed again:\n{log}");
    Ok(())
}

/// Waits until `identity` holds the Lease.
async fn leads(rig: &Rig, identity: &str, secs: u64) {
    rig.eventually(&format!("{identity} to lead"), secs, || async {
        (lease_holder(rig).await.as_deref() == Some(identity)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_refusing_services_shows_in_status_and_recovers() {
    rig::run(scenario_a_quota_refusing_services_shows_in_status_and_recovers).await
}

async fn scenario_a_quota_refusing_services_shows_in_status_and_recovers(
    rig: &mut Rig,
) -> anyhow::Result<()> {
    let quotas = rig.api::<ResourceQuota>();
    let quota = json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "no-services", "namespace": SHOP},
        "spec": {"hard": {"services": "0"}},
    });
    quotas
        .patch(
            "no-services",
            &PatchParams::apply(rig::KUBECTL),
            &Patch::Apply(&quota),
        )
        .await?;
    // Admission refuses everything it counts until the quota controller has filled status.
    rig.eventually("the quota's status", 30, || async {
        let q = quotas.get("no-services").await.ok()?;
        q.status?.hard.is_some().then_some(())
    })
    .await;
    rig.start_operator("op-a")?;
    let rig = &*rig;
    let name = "quota";
    let start = Timestamp::now() + SignedDuration::from_secs(120);
    rig.apply_sale(&rig::sale(name, start, 30, 10)).await?;
    let service = format!("{name}-gateway");

    let failed = rig
        .eventually("a condition naming the refused Service", 30, || async {
            let s = get_sale(rig, name).await?;
            let ready = condition(&s, "Ready")?;
            (ready.status == "False"
                && ready.message.contains(&service)
                && ready.message.contains("exceeded quota"))
            .then(|| ready.clone())
        })
        .await;
    eprintln!("Ready=False: {} {}", failed.reason, failed.message);
    let refused = |events: &[(String, String, String)]| {
        events
            .iter()
            .any(|(t, _, note)| t == "Warning" && note.contains("exceeded quota"))
    };
    let events = rig.events_once(name, 10, refused).await?;
    assert!(refused(&events), "no Warning Event: {events:?}");
    // Everything else of the sale is in place.
    for d in [format!("{name}-gateway"), format!("{name}-consumer")] {
        assert!(
            rig.api::<Deployment>().get_opt(&d).await?.is_some(),
            "{d} missing"
        );
    }
    assert!(
        rig.api::<ConfigMap>()
            .get_opt(&format!("{name}-dataplane"))
            .await?
            .is_some()
    );

    quotas
        .delete("no-services", &DeleteParams::default())
        .await?;
    rig.eventually("the Service once the quota is gone", 60, || async {
        rig.api::<Service>()
            .get_opt(&service)
            .await
            .ok()?
            .map(|_| ())
    })
    .await;
    rig.eventually("Ready again", 30, || async {
        let s = get_sale(rig, name).await?;
        (condition(&s, "Ready")?.status == "True").then_some(())
    })
    .await;
    Ok(())
}

/// One operator and the stand-in kubelet, and a sale `name` opening in 3 s,
/// Active with two gateways available; its start time.
async fn live_sale_with_gateways<'r>(
    rig: &'r mut Rig,
    name: &str,
) -> anyhow::Result<(&'r Rig, Timestamp)> {
    rig.start_operator("op-a")?;
    rig.start_kubelet()?;
    let rig = &*rig;
    let start = Timestamp::now() + SignedDuration::from_secs(3);
    rig.apply_sale(&rig::sale(name, start, 3, 30)).await?;
    reach(rig, name, SalePhase::Active, 40).await;
    rig.eventually("gateways available", 40, || async {
        let s = get_sale(rig, name).await?;
        (s.status?.gateway?.available_replicas? >= 2).then_some(())
    })
    .await;
    Ok((rig, start))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_live_sale_costs_few_api_writes() {
    rig::run(scenario_an_idle_live_sale_costs_few_api_writes).await
}

async fn scenario_an_idle_live_sale_costs_few_api_writes(rig: &mut Rig) -> anyhow::Result<()> {
    let name = "quiet";
    let (rig, _) = live_sale_with_gateways(rig, name).await?;
    // Let scaling settle, then count a minute of the operator's writes.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let since = Timestamp::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let writes = rig::writes_by(&rig.plane.audit_log(), &rig::operator_user(), since)?;
    let (lease, others): (Vec<_>, Vec<_>) = writes.iter().partition(|w| w.resource == "leases");
    eprintln!(
        "operator writes in 60 s of an idle live sale: {} (+ {} Lease renewals): {others:?}",
        others.len(),
        lease.len()
    );
    // Nothing changes, so nothing needs writing; the bound leaves room for the
    // autoscaler's figures, written at most every 15 s when they move.
    assert!(
        others.len() <= 4,
        "{} writes in a minute of an idle sale: {others:?}",
        others.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_edit_mid_sale_rolls_no_pods() {
    rig::run(scenario_a_stock_edit_mid_sale_rolls_no_pods).await
}

async fn scenario_a_stock_edit_mid_sale_rolls_no_pods(rig: &mut Rig) -> anyhow::Result<()> {
    let name = "restock";
    let (rig, start) = live_sale_with_gateways(rig, name).await?;
    let before = rollout_state(rig, name).await?;

    // `kubectl patch fs restock --type merge -p '{"spec":{"products":[…]}}'`
    let mut products = rig::sale(name, start, 3, 30)["spec"]["products"].clone();
    products[0]["stock"] = json!(150);
    let patch = json!({"spec": {"products": products}});
    let kubectl_patch = PatchParams {
        field_manager: Some("kubectl-patch".into()),
        ..Default::default()
    };
    rig.sales()
        .patch(name, &kubectl_patch, &Patch::Merge(&patch))
        .await?;
    rig.eventually("the new stock in status", 30, || async {
        let s = get_sale(rig, name).await?;
        let st = s.status?;
        let phone = st.products.iter().find(|p| p.sku == "phone-17")?;
        (phone.stock == 150 && st.remaining == Some(450)).then_some(())
    })
    .await;
    // Give the deployment controller time to have rolled, if it were going to.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rollout_state(rig, name).await?;
    assert_eq!(
        after.annotations, before.annotations,
        "the pod templates' annotations changed: pods roll mid-sale"
    );
    assert!(
        after.templates == before.templates,
        "the pod templates changed"
    );
    assert_eq!(
        after.replica_sets, before.replica_sets,
        "a new ReplicaSet: pods rolled mid-sale"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_whose_redis_lost_its_keys_is_not_warmed_anew() {
    rig::run(scenario_a_sale_whose_redis_lost_its_keys_is_not_warmed_anew).await
}

/// The phone stock the sale's ConfigMap holds (what its pods run).
async fn deployed_phone_stock(rig: &Rig, name: &str) -> Option<i64> {
    let map = rig
        .api::<ConfigMap>()
        .get_opt(&format!("{name}-dataplane"))
        .await
        .ok()??;
    let doc = map.data?.remove("sale.yaml")?;
    let doc = dataplane::spec::SaleDocument::parse(&doc, "ConfigMap").ok()?;
    doc.spec
        .products
        .iter()
        .find(|p| p.sku == "phone-17")
        .map(|p| p.stock)
}

async fn scenario_a_sale_whose_redis_lost_its_keys_is_not_warmed_anew(
    rig: &mut Rig,
) -> anyhow::Result<()> {
    let name = "amnesia";
    let (rig, start) = live_sale_with_gateways(rig, name).await?;
    let port = gateway_port(rig).await;
    let (status, body) = purchase(port, name, "alice", "phone-17").await?;
    assert_eq!(status, 202, "{body}");
    let store = dataplane::store::OrderStore::connect(&rig.postgres.url(), 1)?;
    let id = dataplane::spec::SaleId::new(SHOP, name);
    rig.eventually("alice's order persisted", 30, || async {
        let tally = store.order_tallies(&id).await.ok()?;
        (tally.iter().map(|t| t.orders).sum::<i64>() == 1).then_some(())
    })
    .await;

    // Redis restarts without its data; then someone raises the phone's stock.
    let client = redis::Client::open(rig.redis.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
    let mut products = rig::sale(name, start, 3, 30)["spec"]["products"].clone();
    products[0]["stock"] = json!(150);
    rig.sales()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"products": products}})),
        )
        .await?;

    // Refused, said in status, and the pods keep the spec they run.
    let refused = rig
        .eventually("StockMissing in status", 60, || async {
            let s = get_sale(rig, name).await?;
            let ready = condition(&s, "Ready")?;
            (ready.status == "False" && ready.reason == "StockMissing").then_some(s)
        })
        .await;
    let message = condition(&refused, "Ready").map(|c| c.message.clone());
    assert!(
        message.as_deref().is_some_and(|m| m.contains("--restore")),
        "{message:?}"
    );
    let counters =
        dataplane::counters::product_counters(&mut conn, &id, &refused.spec.sale).await?;
    assert!(
        counters.iter().all(Option::is_none),
        "warmed anew: {counters:?}"
    );
    assert_eq!(deployed_phone_stock(rig, name).await, Some(100));

    // A person restores the sale from PostgreSQL; the operator's next look
    // applies the edit.
    let restored =
        dataplane::restore::restore_lost(&mut conn, &store, &id, &refused.spec.sale).await?;
    assert_eq!(restored.len(), 1, "{restored:?}");
    rig.eventually("the edit applied after the restore", 60, || async {
        let s = get_sale(rig, name).await?;
        let st = s.status.as_ref()?;
        let phone = st.products.iter().find(|p| p.sku == "phone-17")?;
        let ready = condition(&s, "Ready")?;
        (phone.stock == 150 && phone.remaining == 149 && ready.status == "True").then_some(())
    })
    .await;
    assert_eq!(deployed_phone_stock(rig, name).await, Some(150));
    // Alice still holds her one phone: the limit of 1 refuses a second (her
    // key's record went with Redis, so it is a new purchase).
    let (status, body) = purchase(port, name, "alice", "phone-17").await?;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("limit_reached"), "{body}");
    Ok(())
}
