//! The Helm chart rendered by the real Helm engine: PyPI's `helm-python-sdk`
//! (a library build of Helm v4) in a throwaway venv, created on first use.
//! Shared by the chart tests and the end-to-end tests that apply its RBAC.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use dataplane::tools::pyenv::Venv;
use serde::Deserialize as _;
use serde_json::{Value, json};

const SDK: &str = "helm-python-sdk==0.2.2";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn chart_dir() -> PathBuf {
    workspace().join("charts/flashsale")
}

/// The venv's python with helm-python-sdk importable; built once, cached in
/// ~/.cache/flashsale (`dataplane::tools::pyenv`).
fn python() -> &'static Path {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let ready = PYTHON.get_or_init(|| {
        Venv::ensure("helm-venv", &format!("{SDK}\n"), "import helm_python")
            .map(|v| v.python())
            .map_err(|e| e.to_string())
    });
    match ready {
        Ok(p) => p,
        Err(e) => panic!("the chart tests need helm-python-sdk in a venv: {e}"),
    }
}

pub struct Rendered {
    /// Every rendered object, parsed.
    pub objects: Vec<Value>,
    pub notes: String,
    pub crds: Vec<Value>,
    pub schema_error: Option<String>,
    /// A template's `fail`, as `helm install` would print it.
    pub render_error: Option<String>,
    pub lint: Value,
}

impl Rendered {
    pub fn find(&self, kind: &str, name_suffix: &str) -> Option<&Value> {
        self.objects.iter().find(|o| {
            o["kind"] == json!(kind)
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(name_suffix))
        })
    }

    pub fn get(&self, kind: &str, name_suffix: &str) -> &Value {
        match self.find(kind, name_suffix) {
            Some(o) => o,
            None => panic!("no {kind} named *{name_suffix} among {:?}", self.kinds()),
        }
    }

    pub fn kinds(&self) -> Vec<String> {
        self.objects
            .iter()
            .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
            .collect()
    }
}

fn yaml_documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// The chart in `charts/flashsale`, as release `flashsale` in `flashsale-system`.
pub fn render(values: Value) -> anyhow::Result<Rendered> {
    render_chart(&chart_dir(), values)
}

/// The chart at `chart`, as release `flashsale` in `flashsale-system`.
pub fn render_chart(chart: &Path, values: Value) -> anyhow::Result<Rendered> {
    let request = json!({
        "chart": chart,
        "values": values,
        "release": "flashsale",
        "namespace": "flashsale-system",
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helm_render.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(serde_json::to_string(&request)?.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm_render.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout)?;
    let mut objects = Vec::new();
    let mut notes = String::new();
    for (template, text) in reply["manifests"].as_object().into_iter().flatten() {
        let text = text.as_str().unwrap_or_default();
        if template.ends_with("NOTES.txt") {
            notes = text.to_string();
        } else {
            objects.extend(yaml_documents(text)?);
        }
    }
    let mut crds = Vec::new();
    for crd in reply["crds"].as_array().into_iter().flatten() {
        crds.extend(yaml_documents(crd["data"].as_str().unwrap_or_default())?);
    }
    Ok(Rendered {
        objects,
        notes,
        crds,
        schema_error: reply["schema_error"].as_str().map(String::from),
        render_error: reply["render_error"].as_str().map(String::from),
        lint: reply["lint"].clone(),
    })
}

/// A copy of the chart whose `kubeVersion` admits `version`, for the tests
/// against the v1.20 control plane built here: the chart states the range the
/// operator supports in production (newer), and `helm install` on 1.20 would
/// refuse it. Only that line changes; every template is the chart's own.
pub fn chart_for_kube(version: &str) -> anyhow::Result<tempfile::TempDir> {
    let copy = tempfile::Builder::new()
        .prefix("flashsale-chart-")
        .tempdir()?;
    copy_dir(&chart_dir(), copy.path())?;
    let chart_yaml = copy.path().join("Chart.yaml");
    let text = std::fs::read_to_string(&chart_yaml)?;
    let replaced: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("kubeVersion:") {
                format!("kubeVersion: \">={version}-0\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&chart_yaml, replaced.join("\n") + "\n")?;
    Ok(copy)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
