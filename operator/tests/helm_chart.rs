//! The Helm chart rendered and linted by the real Helm engine: PyPI's
//! `helm-python-sdk` (a library build of Helm v4) in a throwaway venv, created
//! here on first use. No helm binary, no cluster.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use support::helm::{Rendered, chart_dir, render, workspace};

/// (API group, resource, verbs) as the README's permission tables list them.
fn documented_rules() -> anyhow::Result<BTreeSet<(String, String, BTreeSet<String>)>> {
    let readme = std::fs::read_to_string(chart_dir().join("README.md"))?;
    let mut rules = BTreeSet::new();
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let group = cells[1].trim_matches('`').to_string();
        let resource = cells[2].trim_matches('`').to_string();
        let verbs = cells[3].split(',').map(|v| v.trim().to_string()).collect();
        rules.insert((group, resource, verbs));
    }
    Ok(rules)
}

fn rendered_rules(r: &Rendered) -> BTreeSet<(String, String, BTreeSet<String>)> {
    let mut rules = BTreeSet::new();
    for role in r
        .objects
        .iter()
        .filter(|o| o["kind"] == json!("ClusterRole") || o["kind"] == json!("Role"))
    {
        for rule in role["rules"].as_array().into_iter().flatten() {
            let verbs: BTreeSet<String> = rule["verbs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            for group in rule["apiGroups"].as_array().into_iter().flatten() {
                for resource in rule["resources"].as_array().into_iter().flatten() {
                    rules.insert((
                        group.as_str().unwrap_or_default().to_string(),
                        resource.as_str().unwrap_or_default().to_string(),
                        verbs.clone(),
                    ));
                }
            }
        }
    }
    rules
}

#[test]
fn the_chart_lints_clean() -> anyhow::Result<()> {
    let r = render(json!({}))?;
    assert_eq!(r.lint["errors"], json!([]), "{}", r.lint);
    let serious: Vec<&Value> = r.lint["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["severity"].as_i64().unwrap_or(0) >= 2)
        .collect();
    assert!(serious.is_empty(), "lint warnings: {serious:?}");
    Ok(())
}

#[test]
fn the_crd_ships_with_the_chart() -> anyhow::Result<()> {
    let r = render(json!({}))?;
    assert_eq!(r.crds.len(), 1);
    let crd = &r.crds[0];
    assert_eq!(crd["kind"], json!("CustomResourceDefinition"));
    assert_eq!(crd["metadata"]["name"], json!("flashsales.flashsale.dev"));
    let generated = serde_json::to_value(operator::crd::definition())?;
    assert_eq!(crd, &generated);
    Ok(())
}

/// The chart's `kubeVersion` is what the operator needs of a server, and the
/// docs say the same floor.
#[test]
fn kube_version_is_the_supported_floor() -> anyhow::Result<()> {
    let (major, minor) = operator::served::MIN_KUBERNETES;
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml"))?)?;
    assert_eq!(
        chart["kubeVersion"],
        json!(format!(">={major}.{minor}.0-0")),
        "Chart.yaml"
    );
    let docs = std::fs::read_to_string(workspace().join("docs/operator.md"))?;
    assert!(
        docs.contains(&format!("**{major}.{minor} and newer**")),
        "docs/operator.md states the supported range"
    );
    let readme = std::fs::read_to_string(chart_dir().join("README.md"))?;
    assert!(readme.contains(&format!("Kubernetes {major}.{minor} or newer")));
    // The reason for the floor: the CRD carries CEL rules.
    let crd = serde_json::to_value(operator::crd::definition())?;
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert!(spec["x-kubernetes-validations"].is_array());
    Ok(())
}

#[test]
fn rbac_is_exactly_what_the_readme_documents() -> anyhow::Result<()> {
    let r = render(json!({}))?;
    let documented = documented_rules()?;
    assert_eq!(documented.len(), 11, "README tables: {documented:?}");
    assert_eq!(rendered_rules(&r), documented);
    let binding = r.get("ClusterRoleBinding", "flashsale");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "flashsale", "namespace": "flashsale-system"}])
    );
    r.get("ServiceAccount", "flashsale");
    r.get("RoleBinding", "flashsale-leader-election");
    Ok(())
}

#[test]
fn the_operator_pod_is_locked_down() -> anyhow::Result<()> {
    let r = render(json!({}))?;
    let d = r.get("Deployment", "flashsale");
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], json!(true));
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        json!("RuntimeDefault")
    );
    let c = &pod["containers"][0];
    assert_eq!(
        c["securityContext"],
        json!({
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]}
        })
    );
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], json!("/healthz"));
    assert_eq!(d["spec"]["replicas"], json!(2));
    Ok(())
}

#[test]
fn values_are_honoured() -> anyhow::Result<()> {
    let defaults = render(json!({}))?;
    let args = &defaults.get("Deployment", "flashsale")["spec"]["template"]["spec"]["containers"]
        [0]["args"];
    assert!(
        args.as_array()
            .into_iter()
            .flatten()
            .any(|a| a == "--lease-name=flashsale")
    );
    assert!(
        args.as_array()
            .into_iter()
            .flatten()
            .any(|a| a == "--dataplane-image=ghcr.io/flashsale/dataplane:0.1.0")
    );
    assert!(defaults.find("ServiceMonitor", "flashsale").is_none());
    assert!(
        defaults
            .notes
            .contains("kubectl apply -f examples/singles-day.yaml")
    );

    let r = render(json!({
        "replicaCount": 1,
        "image": {"repository": "registry.example/ops/flashsale-operator", "tag": "1.2.3"},
        "dataplaneImage": "registry.example/ops/dataplane:1.2.3",
        "imagePullSecrets": [{"name": "ops-registry"}],
        "dataplaneImagePullSecrets": ["shop-registry"],
        "leaderElection": {"enabled": false},
        "metrics": {"port": 9100, "serviceMonitor": {"enabled": true, "interval": "15s"}}
    }))?;
    let d = r.get("Deployment", "flashsale");
    assert_eq!(d["spec"]["replicas"], json!(1));
    // No lease: an upgrade never runs two operators at once.
    assert_eq!(d["spec"]["strategy"], json!({"type": "Recreate"}));
    assert_eq!(
        defaults.get("Deployment", "flashsale")["spec"]["strategy"],
        Value::Null
    );
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        c["image"],
        json!("registry.example/ops/flashsale-operator:1.2.3")
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(args.contains(&"--no-leader-election"), "{args:?}");
    assert!(args.contains(&"--admin-addr=0.0.0.0:9100"), "{args:?}");
    assert!(args.contains(&"--dataplane-image=registry.example/ops/dataplane:1.2.3"));
    assert!(args.contains(&"--dataplane-image-pull-secret=shop-registry"));
    assert_eq!(
        d["spec"]["template"]["spec"]["imagePullSecrets"],
        json!([{"name": "ops-registry"}])
    );
    assert!(r.find("Role", "leader-election").is_none());
    let monitor = r.get("ServiceMonitor", "flashsale");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], json!("15s"));
    assert_eq!(
        r.get("Service", "flashsale-metrics")["spec"]["ports"][0]["port"],
        json!(9100)
    );
    Ok(())
}

/// An umbrella chart hands every dependency `global`; refusing it (the
/// schema allows no unknown top-level key) would make this chart unusable as one.
#[test]
fn an_umbrella_chart_s_global_values_are_accepted() -> anyhow::Result<()> {
    let r = render(json!({"global": {"imageRegistry": "registry.example"}}))?;
    assert!(r.schema_error.is_none(), "{:?}", r.schema_error);
    assert!(r.render_error.is_none(), "{:?}", r.render_error);
    Ok(())
}

#[test]
fn the_schema_rejects_bad_values() -> anyhow::Result<()> {
    for (values, expected) in [
        (json!({"replicaCount": "two"}), "/replicaCount"),
        // Without leader election every replica would reconcile every sale.
        (
            json!({"replicaCount": 2, "leaderElection": {"enabled": false}}),
            "/replicaCount",
        ),
        (json!({"logFormat": "xml"}), "/logFormat"),
        (
            json!({"metrics": {"service": {"enabled": false}, "serviceMonitor": {"enabled": true}}}),
            "/metrics/service/enabled",
        ),
        (
            json!({"dataplaneImagePullSecrets": ["Not A Name"]}),
            "dataplaneImagePullSecrets",
        ),
        (json!({"replicas": 2}), "replicas"),
        (
            json!({"metrics": {"serviceMonitor": {"interval": "soon"}}}),
            "interval",
        ),
        (
            json!({"metrics": {"podMonitor": {"interval": "often"}}}),
            "interval",
        ),
        (json!({"dashboards": {"enabled": "yes"}}), "enabled"),
        (json!({"dashboards": {"label": "no spaces"}}), "label"),
        (
            json!({"prometheusRule": {"runbookBaseUrl": "docs/operations.md"}}),
            "runbookBaseUrl",
        ),
        (json!({"prometheusRule": {"rules": []}}), "rules"),
    ] {
        let r = render(values.clone())?;
        let error = r.schema_error.unwrap_or_default();
        assert!(error.contains(expected), "{values}: {error:?}");
    }
    // Beyond the schema (two fields compared): the template refuses it.
    let r =
        render(json!({"leaderElection": {"leaseDurationSeconds": 15, "leaseGraceSeconds": 15}}))?;
    let error = r.render_error.unwrap_or_default();
    assert!(
        error.contains("leaseGraceSeconds must be below"),
        "{error:?}"
    );
    Ok(())
}

#[test]
fn the_chart_lints_clean_with_monitoring_on() -> anyhow::Result<()> {
    let r = render(json!({
        "dashboards": {"enabled": true},
        "prometheusRule": {"enabled": true},
        "metrics": {"serviceMonitor": {"enabled": true}, "podMonitor": {"enabled": true}}
    }))?;
    assert_eq!(r.lint["errors"], json!([]), "{}", r.lint);
    assert!(r.schema_error.is_none(), "{:?}", r.schema_error);
    for kind in ["PrometheusRule", "PodMonitor", "ServiceMonitor"] {
        assert!(r.objects.iter().any(|o| o["kind"] == json!(kind)), "{kind}");
    }
    Ok(())
}

#[test]
fn monitoring_objects_are_off_by_default() -> anyhow::Result<()> {
    let r = render(json!({}))?;
    for kind in [
        "PrometheusRule",
        "PodMonitor",
        "ServiceMonitor",
        "ConfigMap",
    ] {
        assert!(
            r.objects.iter().all(|o| o["kind"] != json!(kind)),
            "{kind} rendered by default: {:?}",
            r.kinds()
        );
    }
    Ok(())
}

fn chart_text(path: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(chart_dir().join(path))?)
}

#[test]
fn dashboards_ship_as_configmaps_for_the_grafana_sidecar() -> anyhow::Result<()> {
    let r = render(json!({"dashboards": {"enabled": true}}))?;
    for name in ["sale", "operator"] {
        let cm = r.get("ConfigMap", &format!("flashsale-dashboard-{name}"));
        assert_eq!(cm["metadata"]["namespace"], json!("flashsale-system"));
        assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], json!("1"));
        let shipped: Value = serde_json::from_str(
            cm["data"][format!("flashsale-{name}.json")]
                .as_str()
                .unwrap_or_default(),
        )?;
        let source: Value = serde_json::from_str(&chart_text(&format!("dashboards/{name}.json"))?)?;
        assert_eq!(shipped, source);
        assert_eq!(shipped["uid"], json!(format!("flashsale-{name}")));
    }

    let r = render(json!({"dashboards": {
        "enabled": true, "label": "grafana.com/dashboard", "labelValue": "yes",
        "namespace": "monitoring", "annotations": {"grafana_folder": "flashsale"}
    }}))?;
    let cm = r.get("ConfigMap", "flashsale-dashboard-sale");
    assert_eq!(cm["metadata"]["namespace"], json!("monitoring"));
    assert_eq!(
        cm["metadata"]["labels"]["grafana.com/dashboard"],
        json!("yes")
    );
    assert!(cm["metadata"]["labels"].get("grafana_dashboard").is_none());
    assert_eq!(
        cm["metadata"]["annotations"]["grafana_folder"],
        json!("flashsale")
    );
    Ok(())
}

/// `promtool`, or a failure that says how to install it.
fn promtool() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    match std::env::split_paths(&path)
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file())
    {
        Some(p) => p,
        None => panic!("promtool not found on PATH; install it: apt-get install -y prometheus"),
    }
}

fn run_promtool(args: &[&str], dir: &Path) -> anyhow::Result<String> {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

/// GitHub's anchor for a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn the_prometheus_rule_is_the_rules_file_and_promtool_passes_it() -> anyhow::Result<()> {
    let r = render(
        json!({"prometheusRule": {"enabled": true, "labels": {"release": "kube-prometheus-stack"}}}),
    )?;
    let rule = r.get("PrometheusRule", "flashsale");
    assert_eq!(rule["apiVersion"], json!("monitoring.coreos.com/v1"));
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        json!("kube-prometheus-stack")
    );
    let source: Value = serde_yaml::from_str(&chart_text("rules/flashsale.rules.yaml")?)?;
    assert_eq!(rule["spec"], source);

    // promtool on what the chart renders: the rules check, then the unit tests.
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("flashsale.rules.yaml"),
        serde_yaml::to_string(&rule["spec"])?,
    )?;
    std::fs::write(
        dir.path().join("flashsale.rules.test.yaml"),
        chart_text("rules/flashsale.rules.test.yaml")?,
    )?;
    let checked = run_promtool(&["check", "rules", "flashsale.rules.yaml"], dir.path())?;
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    let tested = run_promtool(&["test", "rules", "flashsale.rules.test.yaml"], dir.path())?;
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every alert has a runbook link to its own section of docs/operations.md.
    let ops = std::fs::read_to_string(workspace().join("docs/operations.md"))?;
    let anchors: BTreeSet<String> = ops
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(anchor)
        .collect();
    let rules: Vec<&Value> = rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(rules.len(), 10);
    for rule in &rules {
        let name = rule["alert"].as_str().unwrap_or_default();
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        let (base, fragment) = url.split_once('#').unwrap_or_default();
        assert_eq!(
            base, "https://example.invalid/flashsale/blob/main/docs/operations.md",
            "{name}"
        );
        assert_eq!(fragment, anchor(name), "{name}");
        assert!(
            anchors.contains(fragment),
            "{name}: no heading for #{fragment}"
        );
        assert!(rule["labels"]["severity"].is_string(), "{name}");
        assert!(rule["annotations"]["summary"].is_string(), "{name}");
    }

    let r = render(json!({"prometheusRule": {
        "enabled": true, "runbookBaseUrl": "https://wiki.shop.example/flashsale/operations"
    }}))?;
    let text = serde_json::to_string(&r.get("PrometheusRule", "flashsale")["spec"])?;
    assert_eq!(
        text.matches("https://wiki.shop.example/flashsale/operations#")
            .count(),
        10
    );
    assert!(!text.contains("example.invalid"));
    Ok(())
}

#[test]
fn the_pod_monitor_selects_the_pods_the_operator_creates() -> anyhow::Result<()> {
    use operator::children::{self, Component};
    let r = render(json!({"metrics": {
        "serviceMonitor": {"enabled": true},
        "podMonitor": {"enabled": true, "interval": "10s", "labels": {"release": "kps"}}
    }}))?;
    let monitor = r.get("PodMonitor", "flashsale-dataplane");
    let spec = &monitor["spec"];
    assert_eq!(spec["namespaceSelector"], json!({"any": true}));
    assert_eq!(monitor["metadata"]["labels"]["release"], json!("kps"));
    let endpoint = &spec["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], json!("admin"));
    assert_eq!(endpoint["path"], json!("/metrics"));
    assert_eq!(endpoint["interval"], json!("10s"));
    let targets: BTreeSet<&str> = endpoint["relabelings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["targetLabel"].as_str())
        .collect();
    assert_eq!(targets, BTreeSet::from(["sale", "component"]));

    // The selector matches gateway and consumer pods, not the operator's own.
    let selects = |labels: &serde_json::Map<String, Value>| {
        let matched = spec["selector"]["matchLabels"]
            .as_object()
            .into_iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v));
        let component = labels
            .get("app.kubernetes.io/component")
            .and_then(Value::as_str)
            .unwrap_or_default();
        matched
            && spec["selector"]["matchExpressions"][0]["values"]
                .as_array()
                .is_some_and(|vs| vs.iter().any(|v| v == component))
    };
    for component in [Component::Gateway, Component::Consumer] {
        let labels = serde_json::to_value(children::labels("singles-day", Some(component)))?;
        assert!(
            selects(labels.as_object().unwrap_or(&Default::default())),
            "{component:?}"
        );
    }
    let operator_pod = &r.get("Deployment", "flashsale")["spec"]["template"]["metadata"]["labels"];
    assert!(!selects(
        operator_pod.as_object().unwrap_or(&Default::default())
    ));
    assert_eq!(children::ADMIN_PORT, 9090);

    // The operator's per-sale series keep the sale's namespace.
    let sm = r.get("ServiceMonitor", "flashsale");
    assert_eq!(sm["spec"]["endpoints"][0]["honorLabels"], json!(true));

    let r = render(json!({"metrics": {"podMonitor": {"enabled": true, "namespaces": ["shop"]}}}))?;
    assert_eq!(
        r.get("PodMonitor", "flashsale-dataplane")["spec"]["namespaceSelector"],
        json!({"matchNames": ["shop"]})
    );
    Ok(())
}
